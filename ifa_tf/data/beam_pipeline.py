"""`ifa-data from-log --runner=...`: the log converter as an Apache Beam pipeline.

The same conversion as `log_converter.convert_log`, run by Beam's workers: locally by the
DirectRunner in multi-process mode (one worker per core), on a cluster by Dataflow, Flink
or Spark (`pipeline_options`). It is the in-process converter's logic, not a copy of it:
the pipeline's steps call the functions the in-process converter calls, on a part of the
log each.

- read: one worker per file (a glob, `.gz` files): `log_converter.RowParser` parses the
  rows (malformed rows fail the run naming the file and lines, or are skipped and counted
  with `skip_bad_rows`), `log_converter.encode_id` maps the ids.
- per user (grouped by user): `user_requests.merge_and_sort`, the user's timeline, written
  to files of timelines in the work directory (`user_timelines`). The grouping runs in
  groups of users, one step each (`user_groups`: with the DirectRunner, one group per 32
  MiB of log for each worker, or `--user_groups`); the steps after it read the timelines
  from the files, one file at a time.
- global statistics, as combiners over the workers' partial results, then side inputs:
  the split time (`log_statistics` radix selection: four passes of a 65,536-bucket
  histogram), the popularity counts and strata (`ItemCounts`, `make_sampler`), each item's
  first category, the id tables and vocabularies, each user's first request index in each
  split (so that a request goes to the shard the in-process converter puts it in).
- per user again (a file of timelines at a time): `user_requests.build_request` and
  `records.encode_example`, written to the shards; the split figures (`SplitStatistics`)
  and the leak audit's train statistics (`leak_audit.TrainStatistics`) as combiners.
- leak audit (the test requests' entries written to files by the build, read one file at
  a time): each test request scored (`leak_audit.score_request`), pooled AUC from
  histograms of disjoint ranges of score values (`ScoreHistogram`, `pooled_auc`: exact),
  GAUC summed exactly (`GroupedAUC`).

The result: the same requests in the same shard files (each file's records in another
order), the same vocabularies, and a `metadata.json` equal to the in-process one.

What a worker holds: one user's events at a time, buffers of a bounded size, and side
inputs that grow with the number of items (popularity, categories, the audit's
co-occurrence profiles: 2 KB an item) and of users (each user's first request index: 24
bytes a user), not with the number of events. Exceptions: the distinct ids of one role
(to write its vocabulary and count collisions), one range of the audit's score values,
and with `negatives="exposure"` every request's window (the sampler draws from other
users' windows nearest in time). With the DirectRunner, the driver process also holds the data between
steps (the runner's shuffle), which grows with the log; on a cluster the runner's shuffle
service holds it.

Why the files of timelines and the groups of users: the DirectRunner (Beam's FnApiRunner)
sends each worker its whole share of a step's input as one message (its `GroupingBuffer.
partition` makes one part per worker, and `_send_input_to_worker` writes every part whole
before it flushes), so that a worker holds its share of a step's input at once, with
gRPC's and protobuf's copies of it. Grouped by user in one step, that is half the log's
events for each of two workers; read from files, a step's input is the files' names, and
a grouping step's input is one group's events (the audit's score histograms likewise). A cluster's runner streams a step's input
to its workers: there the grouping runs in one group, and the files cost one more write
and read of the timelines.
"""

import contextlib
import gzip
import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions, GoogleCloudOptions,
                                                  PipelineOptions, StandardOptions)
from apache_beam.transforms import window

from ifa_tf.data import leak_audit, log_converter, log_statistics, records, user_requests
from ifa_tf.data.beam_options import ConversionOptions

_FLUSH_EVENTS = 1 << 18  # read: events buffered per worker before they are emitted by user
_FLUSH_IDS = 1 << 17  # read: distinct ids remembered per worker before they are emitted
_FLUSH_SCORES = 1 << 19  # audit: score values held per worker before they are emitted
_SCORE_RANGE_BITS = 20
# The DirectRunner's grouping by user runs in one group of users per
# GROUP_BYTES_PER_WORKER of log for each worker (`user_groups`); a .gz file's bytes count
# _GZIP_RATIO times.
GROUP_BYTES_PER_WORKER = 32 << 20
_GZIP_RATIO = 4
# glibc's allocator settings for the DirectRunner's workers: blocks of 128 KiB or more are
# mapped and unmapped on their own, and the heap is trimmed above 128 KiB free. By default
# glibc raises its mapping threshold after each large block freed (up to 32 MiB) and keeps
# what is freed in its heap, so that a worker's resident memory kept the peak of every step
# it ran (benchmarks/results/beam).
WORKER_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_WORK_PREFIX = ".tmp-beam-"
_logger = logging.getLogger("ifa_tf.data.log_converter")


def default_options(runner="DirectRunner", num_workers=None, extra=()):
    """`PipelineOptions` for `runner`: with the DirectRunner, its multi-process mode with
    `num_workers` workers (default one per core); `extra`: further Beam options
    (`--project=...`, `--flink_master=...`), passed through."""
    flags = [f"--runner={runner}", *extra]
    if runner == "DirectRunner" and not any(f.startswith("--direct_running_mode")
                                            for f in extra):
        flags.append("--direct_running_mode=multi_processing")
    if runner == "DirectRunner" and not any(f.startswith("--direct_num_workers")
                                            for f in extra):
        flags.append(f"--direct_num_workers={num_workers or os.cpu_count() or 1}")
    return PipelineOptions(flags)


# ------------------------------------------------------------------------------ driving
def convert_log(path, output_dir, config, num_shards=1, compression="gzip", source=None,
                options=None, run_context=None):
    """Converts the log at `path` (a file, a `.gz` file or a glob) into `output_dir` with a
    Beam pipeline run under `options` (`default_options()` when None): the records, the
    vocabularies and `metadata.json` of `log_converter.convert_log`. Returns the metadata.
    `run_context()`: a context manager the run happens in (the command line's, which keeps
    the local workers' start-up lines off the terminal). Malformed rows are logged by the
    workers that read them (skipped, or listed in the error that ends the run).
    """
    records.check_compression(compression)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer. "
                         f"Received: num_shards={num_shards!r}")
    files = match_files(path)
    parser = log_converter.RowParser(config)  # the item table is read (and checked) here
    created = not FileSystems.exists(output_dir)
    if created:
        FileSystems.mkdirs(output_dir)
    work = FileSystems.join(output_dir, _WORK_PREFIX + uuid.uuid4().hex[:12])
    finished = False
    try:
        FileSystems.mkdirs(work)
        FileSystems.mkdirs(FileSystems.join(work, "records"))
        FileSystems.mkdirs(FileSystems.join(work, "timelines"))
        pipeline = beam.Pipeline(options=options or default_options())
        summary = SummaryFiles(FileSystems.join(work, "summary"))
        _build_conversion(pipeline, summary, files, parser, config, output_dir, work,
                          num_shards, compression)
        run(pipeline, run_context)
        metadata = _finish(summary.read(), files, config, output_dir, compression,
                           source or {"log": os.path.abspath(path) if "://" not in path
                                      else path})
        finished = True
        return metadata
    finally:
        # As in-process, a run that gives no dataset leaves no output directory it made.
        remove(output_dir if created and not finished else work)


def convert_preset(name, data_dir, output_dir, num_shards=1, compression="gzip",
                   options=None, run_context=None, **overrides):
    """`log_converter.convert_preset` as a Beam pipeline (`convert_log`)."""
    log, config, source = log_converter.preset_conversion(name, data_dir, **overrides)
    return convert_log(log, output_dir, config, num_shards, compression, source=source,
                       options=options, run_context=run_context)


def run(pipeline, run_context=None):
    """Runs `pipeline` to its end (inside `run_context()`, when given); a `DataFormatError`
    raised in a worker is raised here as itself. The DirectRunner's worker processes start
    with `WORKER_ALLOCATOR` in their environment."""
    with _data_errors_as_themselves(), _worker_allocator(), (
            run_context or contextlib.nullcontext)():
        pipeline.run().wait_until_finish()


@contextlib.contextmanager
def _worker_allocator():
    """`WORKER_ALLOCATOR` in this process's environment (where not set already) while the
    local runner starts its workers, which inherit it."""
    added = {name: value for name, value in WORKER_ALLOCATOR.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class SummaryFiles:
    """The small results of a pipeline (what its combiners give) for its driver to read
    after the run: `add(name, pcollection)`, then, after the run, `read()`: `{name: [its
    values]}`. They travel as files in `directory` (on a cluster, a place every worker and
    the driver reach: the output directory, or `--temp_location`)."""

    def __init__(self, directory):
        self.directory = directory
        self.names = []
        if not FileSystems.exists(directory):
            FileSystems.mkdirs(directory)

    def add(self, name, pcollection):
        self.names.append(name)
        (pcollection
         | f"Summary {name}" >> beam.Map(lambda value, n=name: (n, value))
         | f"Write summary {name}" >> beam.ParDo(WriteSummary(self.directory)))

    def read(self):
        found = {name: [] for name in self.names}
        pattern = FileSystems.join(self.directory, "*.pickle")
        for match in FileSystems.match([pattern])[0].metadata_list:
            with FileSystems.open(match.path, compression_type="uncompressed") as f:
                name, value = pickle.loads(f.read())
            found[name].append(value)
        return found


def temporary_directory(options):
    """A new directory for a pipeline's small results: under `--temp_location` when given
    (a cluster's shared storage), else on this machine."""
    base = options.view_as(GoogleCloudOptions).temp_location
    if base:
        return FileSystems.join(base, _WORK_PREFIX + uuid.uuid4().hex[:12])
    return tempfile.mkdtemp(prefix=_WORK_PREFIX)


def match_files(pattern):
    """The files of a log, sorted by name, as `log_converter.log_files` finds them, through
    Beam's file systems (local paths, gs://, s3://, hdfs://)."""
    if "://" not in pattern:
        return log_converter.log_files(pattern)
    found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    if not found:
        raise FileNotFoundError(f"{pattern}: no such file, and no file matches it")
    return found


def open_binary(path):
    """A file's bytes, ungzipped when its name ends in `.gz`, through Beam's file systems."""
    raw = FileSystems.open(path, compression_type="uncompressed")
    return gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw


@contextlib.contextmanager
def _data_errors_as_themselves():
    """A `DataFormatError` raised in a worker (bad rows, a log without requests) comes back
    from the runner inside a longer error; it is raised again as itself, one line."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - looked into, and raised again if not ours
        found = re.findall(r"DataFormatError: (.+)", str(error))
        if isinstance(error, records.DataFormatError):
            found = [str(error)]
        if not found:
            raise
        # Without the step Beam names after it (`[while running 'Read/ParDo(ReadFile)']`).
        message = re.sub(r" \[while running '[^']*'\]$", "", found[-1].strip())
        raise records.DataFormatError(message) from None


def _finish(summary, files, config, output_dir, compression, source):
    """`metadata.json` from the pipeline's summary (what `log_converter.convert_events`
    writes, from the same figures)."""
    single = {name: values[0] for name, values in summary.items() if values}
    if not single["num_events"]:
        raise records.DataFormatError("The log holds no valid rows.")
    split = single["split"]
    if not split["count"]:
        raise records.DataFormatError(log_converter.no_request_message(config,
                                                                       *single["time_span"]))
    bad = sorted(single["bad"])
    listed = [(index, line) for index, _, lines in bad for line in lines]
    bad_lines = [line if len(files) == 1 else f"{files[index]}:{line}"
                 for index, line in sorted(listed)[:100]]
    log_statistics.warn_if_no_train(split["count"], split["train"] > 0, config.test_fraction,
                                    split["time"])
    roles = dict(summary["ids"])
    metadata = log_converter.conversion_metadata(
        config, source,
        id_ranges={f"{role}_id": roles[role]["range"] for role in roles},
        vocab_files={role: roles[role]["vocabulary"] for role in roles
                     if roles[role]["vocabulary"]},
        collisions={role: roles[role]["collisions"] for role in roles},
        num_events=single["num_events"], num_bad_rows=sum(count for _, count, _ in bad),
        bad_row_lines=bad_lines, split_time=split["time"])
    metadata["files"] = dict(sorted(single["files"]))
    for name, statistics in sorted(summary["statistics"]):
        metadata["splits"][name] = statistics.result(
            os.path.basename(records.split_pattern(output_dir, name, compression)))
    metadata["negative_fallbacks"] = single["fallbacks"]
    schema = log_converter.log_schema(config)
    parts = {name: {} for name in leak_audit.SCORES}
    for (name, value_range), terms in single["audit_terms"]:
        parts[name][value_range] = terms
    totals = single["audit_totals"] or leak_audit.AuditTotals(schema.tasks)
    metadata["leak_audit"] = totals.result(parts, schema.tasks[0])
    warning = leak_audit.set_size_warning(metadata["leak_audit"])
    if warning:
        _logger.warning("%s", warning)
    for role in roles:
        log_statistics.report_collisions(role, roles[role]["shared"])
    if "://" in output_dir:  # a cluster's file system (gs://, hdfs://, s3://)
        _write_text(FileSystems.join(output_dir, records.METADATA_FILENAME),
                    [records.metadata_text(metadata)])
    else:
        records.write_metadata(output_dir, metadata)
    return metadata


def _shard_counts(split, num_shards):
    counts = {"train": split["train"], "test": split["count"] - split["train"]}
    return {name: min(num_shards, count) for name, count in counts.items() if count}


def remove(path):
    """Removes a work directory (a cluster's: a warning where it cannot)."""
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        FileSystems.delete([path])
    except Exception:  # a clean-up: what is left is named for the user to remove
        _logger.warning("could not remove the pipeline's work directory %s", path)


# --------------------------------------------------------------------------- the graph
def _build_conversion(pipeline, summary, files, parser, config, output_dir, work,
                      num_shards, compression):
    """The conversion's steps (see the module docstring); the figures `metadata.json` needs
    go to `summary` (`SummaryFiles`)."""
    schema = log_converter.log_schema(config)
    read = (pipeline
            | "Files" >> beam.Create(list(enumerate(files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadFile(parser, log_converter.id_roles(config)))
            .with_outputs("ids", "categories", "bad", main="events"))
    summary.add("bad", read.bad | "BadRows" >> beam.combiners.ToList())
    item_category = category_table(read.categories)
    summary.add("ids", read.ids
                | "DistinctIds" >> beam.Distinct()
                | "ByRole" >> beam.Map(lambda entry: (entry[0], (entry[1], entry[2])))
                | "IdsOfRole" >> beam.GroupByKey()
                | "IdTable" >> beam.ParDo(WriteIdTable(output_dir)))

    # The users' timelines, in files of the work directory: the per-user steps below read
    # them from there, one file at a time (see `user_timelines`).
    groups = user_groups(files, pipeline.options)
    stored = user_timelines(read.events, config, work, groups)
    paths = stored | "TimelinePaths" >> beam.Map(lambda f: f.path)
    summary.add("num_events", stored
                | "CountEvents" >> beam.Map(lambda f: f.num_events)
                | "SumEvents" >> beam.CombineGlobally(sum))
    summary.add("time_span", stored
                | "TimeSpans" >> beam.Map(lambda f: f.span)
                | "LogTimeSpan" >> beam.CombineGlobally(_time_span))
    split = _split_time(stored | "RequestTimes" >> beam.Map(lambda f: f.request_times), config)
    summary.add("split", split)

    statistics = paths | "Statistics" >> beam.ParDo(
        UserStatistics(config), split=beam.pvalue.AsSingleton(split)).with_outputs(
            "offsets", "exposure", main="counts")
    counts = statistics.counts | "MergeCounts" >> beam.CombineGlobally(_MergeAll())
    offsets = (statistics.offsets | "Offsets" >> beam.combiners.ToList()
               | "OffsetTable" >> beam.Map(_offset_table))
    exposure = (statistics.exposure | "Exposure" >> beam.combiners.ToList()
                | "ExposureInputs" >> beam.Map(_exposure_inputs))

    built = paths | "Build" >> beam.ParDo(
        BuildRequests(config, schema, num_shards, work),
        split=beam.pvalue.AsSingleton(split),
        counts=beam.pvalue.AsSingleton(counts),
        offsets=beam.pvalue.AsSingleton(offsets),
        exposure=beam.pvalue.AsSingleton(exposure),
        item_category=beam.pvalue.AsSingleton(item_category)).with_outputs(
            "files", "statistics", "train", "fallbacks", main="tests")
    summary.add("statistics", built.statistics | "SplitFigures" >> beam.CombinePerKey(
        _MergeAll()))
    summary.add("fallbacks", built.fallbacks | "Fallbacks" >> beam.CombineGlobally(sum))
    summary.add("files", built.files
                | "ByShard" >> beam.GroupByKey()
                | "Concatenate" >> beam.ParDo(ConcatenateShard(output_dir, compression),
                                              split=beam.pvalue.AsSingleton(split),
                                              num_shards=num_shards)
                | "ShardCounts" >> beam.combiners.ToList())

    train = built.train | "TrainStatistics" >> beam.CombineGlobally(_MergeAll())
    audit = built.tests | "Audit" >> beam.ParDo(
        ScoreTests(schema.tasks), train=beam.pvalue.AsSingleton(train)).with_outputs(
            "histograms", main="totals")
    summary.add("audit_totals", audit.totals | "AuditTotals" >> beam.CombineGlobally(
        _MergeAll()))
    # Grouped, not combined: Beam's combiner lifting would merge a worker's histograms of
    # each range before the shuffle, holding every distinct score of its share of the test
    # split at once; grouped, a worker holds one range's histograms at a time. The ranges
    # are grouped in as many groups as the users (`in_groups`).
    summary.add("audit_terms", in_groups(
        audit.histograms, groups, "HistogramsOfRange",
        lambda element, n: _key_group(hash_key(element[0]), n),
        lambda grouped, label: grouped | label >> beam.MapTuple(
            lambda key, parts: (key, _merged(parts).terms())))
        | "AllTerms" >> beam.combiners.ToList())


def _time_span(spans):
    """`(the longest user's span, the first time, the last time)` of users' (or partial)
    spans; None of none."""
    spans = [span for span in spans if span is not None]
    if not spans:
        return None
    return (max(span[0] for span in spans), min(span[1] for span in spans),
            max(span[2] for span in spans))


def category_table(categories):
    """`{item: category}` of each item's first row in the log, from `ReadFile`'s
    `categories` output (as a singleton)."""
    return (categories
            | "FirstCategories" >> beam.CombineGlobally(_FirstCategories())
            | "CategoryTable" >> beam.Map(lambda first: {item: category for item, (_, category)
                                                         in first.items()}))


def _split_time(times, config):
    """The split time, as a singleton `{"time", "count", "train"}`: the radix selection of
    the request times (`times`: arrays of them), one pass per `log_statistics.RADIX_LEVELS`
    entry."""
    state = (times | "Count" >> beam.ParDo(_TimesSummary())
             | "SumCount" >> beam.CombineGlobally(_CountAndMax())
             | "Rank" >> beam.Map(_selection_start, config.test_fraction))
    for level in range(len(log_statistics.RADIX_LEVELS)):
        histogram = (times
                     | f"Radix{level}" >> beam.ParDo(_RadixPass(level),
                                                     state=beam.pvalue.AsSingleton(state))
                     | f"SumRadix{level}" >> beam.CombineGlobally(_SumArrays()))
        state = (state | f"Narrow{level}" >> beam.Map(
            _narrow, level, histogram=beam.pvalue.AsSingleton(histogram)))
    train = (times | "CountTrain" >> beam.Map(
        lambda t, s: int(np.sum(t < s["time"])), s=beam.pvalue.AsSingleton(state))
        | "SumTrain" >> beam.CombineGlobally(sum))
    return state | "Split" >> beam.Map(
        lambda s, n: {"time": s["time"], "count": s["count"], "train": n},
        n=beam.pvalue.AsSingleton(train))


def _request_times(item, time, bits, config):
    user = one_user_timeline(0, item, time, bits)
    return [p.time for p in user_requests.request_points(user, config)]


class _TimesSummary(beam.DoFn):
    """Per bundle: `(count, max)` of the request times."""

    def start_bundle(self):
        self.summary = (0, -1)

    def process(self, times):
        if len(times):
            self.summary = (self.summary[0] + len(times), max(self.summary[1],
                                                              int(times.max())))

    def finish_bundle(self):
        yield window.GlobalWindows.windowed_value(self.summary)


class _CountAndMax(beam.CombineFn):
    def create_accumulator(self):
        return (0, -1)

    def add_input(self, total, summary):
        return (total[0] + summary[0], max(total[1], summary[1]))

    def merge_accumulators(self, totals):
        totals = list(totals)
        return (sum(t[0] for t in totals), max(t[1] for t in totals))

    def extract_output(self, total):
        return total


def _selection_start(summary, test_fraction):
    count, largest = summary
    rank = log_statistics.split_rank(count, test_fraction) if count else None
    return {"count": count, "max": largest, "rank": rank, "prefix": 0,
            "time": largest + 1 if rank is None else None}


class _RadixPass(beam.DoFn):
    """Per bundle: the histogram of one radix level over the request times."""

    def __init__(self, level):
        self.level = level

    def start_bundle(self):
        self.histogram = None

    def process(self, times, state):
        if state["rank"] is None:
            return
        histogram = log_statistics.radix_histogram(times, self.level, state["prefix"])
        self.histogram = histogram if self.histogram is None else self.histogram + histogram

    def finish_bundle(self):
        if self.histogram is not None:
            yield window.GlobalWindows.windowed_value(self.histogram)


def _narrow(state, level, histogram):
    if state["rank"] is None:
        return state
    prefix, rank = log_statistics.radix_narrow(histogram, level, state["prefix"],
                                               state["rank"])
    last = level == len(log_statistics.RADIX_LEVELS) - 1
    return {**state, "prefix": prefix, "rank": rank, "time": prefix if last else None}


class _SumArrays(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, total, array):
        return array.copy() if total is None else total + array

    def merge_accumulators(self, totals):
        present = [t for t in totals if t is not None]
        return sum(present[1:], present[0].copy()) if present else None

    def extract_output(self, total):
        return np.zeros(1 << 16, np.int64) if total is None else total


# ------------------------------------------------------------------------------ reading
class ReadFile(beam.DoFn):
    """Reads one file of the log: events grouped by user (`(user, [5, k] int64 block)`:
    item, time, action bits, position, category), and as tagged outputs the distinct
    `(role, value, id)` of the ids, each item's first category (`log_statistics.
    first_categories`), and the file's malformed rows (which fail the run unless
    `skip_bad_rows`)."""

    def __init__(self, parser, roles):
        self.parser, self.roles = parser, roles

    def process(self, element):
        index, path = element
        config = self.parser.config
        blocks, buffered, seen = {}, 0, set()
        first, bad = {}, []
        cache = {}
        for line, row, fault in self.parser.rows(path, open_binary=open_binary):
            if fault is not None:
                bad.append((line, fault))
                continue
            ids = []
            for role, value in zip(("user", "item", "category"), row[:3]):
                if role not in self.roles:
                    ids.append(0)
                    continue
                id_ = cache.get((role, value))
                if id_ is None:
                    id_ = cache[role, value] = log_converter.encode_id(value)
                    if len(cache) > _FLUSH_IDS:
                        cache.clear()
                    if (role, value) not in seen:
                        seen.add((role, value))
                        yield beam.pvalue.TaggedOutput("ids", (role, value, id_))
                        if len(seen) > _FLUSH_IDS:
                            seen.clear()
                ids.append(id_)
            user, item, category = ids
            place = log_converter.position(index, line)
            if "category" in self.roles and item not in first:
                first[item] = (place, category)
            blocks.setdefault(user, []).append((item, row[3], row[4], place, category))
            buffered += 1
            if buffered >= _FLUSH_EVENTS:
                yield from _blocks(blocks)
                blocks, buffered = {}, 0
        log_converter.report_bad_rows(path, bad, config.skip_bad_rows)
        yield from _blocks(blocks)
        yield beam.pvalue.TaggedOutput("categories", first)
        yield beam.pvalue.TaggedOutput("bad", (index, len(bad),
                                               [line for line, _ in bad[:100]]))


def _blocks(blocks):
    for user, rows in blocks.items():
        yield user, np.array(rows, np.int64).T


class _FirstCategories(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, first, partial):
        return log_statistics.merge_first_categories(first, partial)

    def merge_accumulators(self, partials):
        first = {}
        for partial in partials:
            log_statistics.merge_first_categories(first, partial)
        return first

    def extract_output(self, first):
        return first


class WriteIdTable(beam.DoFn):
    """One role's ids: their range, their collisions, and `vocab_<role>.tsv` when a value was
    hashed (`log_converter.needs_vocabulary`)."""

    def __init__(self, output_dir):
        self.output_dir = output_dir

    def process(self, element):
        role, entries = element
        table = dict(entries)
        ids = list(table.values())
        name = None
        if log_converter.needs_vocabulary(table):
            name = f"vocab_{role}.tsv"
            _write_text(FileSystems.join(self.output_dir, name),
                        log_statistics.vocabulary_lines((id_, value)
                                                        for value, id_ in table.items()))
        shared = log_statistics.shared_ids(table)
        yield role, {"range": [int(min(ids)), int(max(ids))], "vocabulary": name,
                     "shared": shared, "collisions": sum(len(values) - 1 for values in shared)}


def _write_text(path, lines):
    directory, name = path.rsplit("/", 1)
    tmp_path = f"{directory}/{records.TMP_PREFIX}{name}"
    with FileSystems.create(tmp_path, compression_type="uncompressed") as f:
        for line in lines:
            f.write(line.encode("utf-8"))
    FileSystems.rename([tmp_path], [path])


# ----------------------------------------------------------------------------- per user
def user_groups(files, options, bytes_per_worker=GROUP_BYTES_PER_WORKER):
    """How many groups of users the grouping by user runs in (and the audit's grouping of
    score ranges): `--user_groups` where given; else, with the DirectRunner, one per
    `bytes_per_worker` of the log's files for each worker (a `.gz` file's bytes counted
    `_GZIP_RATIO` times), and 1 on other runners.

    The DirectRunner (Beam's FnApiRunner) sends each worker its whole share of a step's
    input as one message (its `GroupingBuffer.partition` makes one part per worker, which
    `_send_input_to_worker` writes whole): grouped in one step, a worker would hold its
    share of the whole log at once. A cluster's runner streams a step's input."""
    given = options.view_as(ConversionOptions).user_groups
    if given is not None:
        if given < 1:
            raise ValueError(f"--user_groups must be a positive integer. "
                             f"Received: --user_groups={given}")
        return given
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner",
                                                       "SwitchingDirectRunner"):
        return 1
    workers = options.view_as(DirectOptions).direct_num_workers
    workers = (os.cpu_count() or 1) if workers == 0 else (workers or 1)
    size = 0
    for result in FileSystems.match(list(files)):
        for found in result.metadata_list:
            size += found.size_in_bytes * (_GZIP_RATIO if found.path.endswith(".gz") else 1)
    return max(1, -(-size // (bytes_per_worker * workers)))


def user_timelines(events, config, work, groups):
    """`ReadFile`'s events -> each user's timeline (`user_requests.merge_and_sort`), written
    to files under `work`: a PCollection of `TimelineFile`s.

    The users are grouped in `groups` disjoint groups (by a hash of the id), one grouping
    step each, so that a step's input is a group's events. The steps after read the files,
    one at a time: their input is the files' names, so that no step's input holds the
    log's events or timelines (on the DirectRunner, a worker's share of a step's input is
    sent to it whole)."""
    return in_groups(events, groups, "Users", lambda element, n: _key_group(element[0], n),
                     lambda grouped, label: grouped | label >> beam.ParDo(
                         WriteTimelines(config, work)))


def in_groups(pcollection, groups, name, group_of, step):
    """`step(grouped, label)` applied to `pcollection`'s `(key, value)`s grouped by key, in
    `groups` disjoint groups of keys (`group_of(element, groups)`), a grouping step each,
    one after another on the DirectRunner; the results flattened. Nothing after a group's
    step may be a side input of another group's steps (Beam 2.78's local scheduler waits
    forever on a Flatten of steps with side inputs that feeds a side input)."""
    if groups == 1:
        return step(pcollection | f"GroupBy{name}" >> beam.GroupByKey(), f"{name}Step")
    parts = pcollection | f"{name}Groups" >> beam.Partition(group_of, groups)
    done = [step(part | f"GroupBy{name}{index}" >> beam.GroupByKey(), f"{name}Step{index}")
            for index, part in enumerate(parts)]
    return done | f"All{name}" >> beam.Flatten()


def hash_key(key):
    """A stable integer of a `(score name, value range)` key (Python's `hash` of a string
    differs between processes)."""
    name, value_range = key
    return int.from_bytes(hashlib.blake2b(f"{name}/{value_range}".encode(),
                                          digest_size=8).digest(), "little")


def _key_group(key, groups):
    # Users' ids are hashes or raw integers: mixed (splitmix64's finaliser) before the
    # modulo, so that groups of consecutive raw ids are not skewed.
    z = (int(key) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % groups


class TimelineFile:
    """One file of users' timelines (`WriteTimelines`) and what the conversion's global
    figures need of it: events, the users' time span, the request times."""

    def __init__(self, path, num_events, span, request_times):
        self.path, self.num_events, self.span = path, num_events, span
        self.request_times = request_times


class WriteTimelines(beam.DoFn):
    """`(user, [blocks of events])` -> the user's timeline, appended to this bundle's file of
    timelines (a `PickleFile`); per bundle, its `TimelineFile`."""

    def __init__(self, config, work):
        self.config, self.work = config, work

    def start_bundle(self):
        self.file = None

    def process(self, element):
        user, (item, time, bits) = user_timeline(element)
        if self.file is None:
            self.file = PickleFile(FileSystems.join(self.work, "timelines",
                                                    f"{uuid.uuid4().hex}.pickle"))
            self.num_events, self.span, self.times = 0, None, []
        self.file.write((user, item, time, bits))
        self.num_events += len(item)
        self.span = _time_span([self.span, (int(time[-1] - time[0]), int(time[0]),
                                            int(time[-1]))])
        self.times.extend(_request_times(item, time, bits, self.config))

    def finish_bundle(self):
        if self.file is None:
            return
        # Nothing of the bundle stays with the DoFn, which a runner keeps after the bundle.
        out, times, self.file, self.times = self.file, self.times, None, None
        yield window.GlobalWindows.windowed_value(
            TimelineFile(out.close(), self.num_events, self.span, np.array(times, np.int64)))


def read_timelines(path):
    """The `(user, (item, time, bits))` of a `WriteTimelines` file, one at a time."""
    for user, item, time, bits in read_pickled(path):
        yield user, (item, time, bits)


class PickleFile:
    """Objects pickled one after another into a new file at `path` (`read_pickled` reads
    them): `write(value)`, then `close()`, which returns the path."""

    def __init__(self, path):
        self.path = path
        self.file = FileSystems.create(path, compression_type="uncompressed")

    def write(self, value):
        pickle.dump(value, self.file, protocol=pickle.HIGHEST_PROTOCOL)

    def close(self):
        self.file.close()
        return self.path


def read_pickled(path):
    """The objects pickled one after another into the file at `path`, one at a time."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def one_user_timeline(user, item, time, bits):
    return user_requests.Timeline(np.full(len(item), user, np.int64), item, time, bits,
                                  np.array([0, len(item)]))


def user_timeline(element):
    """A user's blocks of events -> `(user, (item, time, bits))`, their
    `user_requests.merge_and_sort` timeline."""
    user, blocks = element
    block = np.concatenate(list(blocks), axis=1)
    timeline = user_requests.merge_and_sort(np.full(block.shape[1], user, np.int64),
                                            block[0], block[1], block[2], block[3])
    return user, (timeline.item, timeline.time, timeline.bits)


class UserStatistics(beam.DoFn):
    """A file of timelines (`WriteTimelines`) -> what each user adds to the global statistics,
    given the split time: train-period popularity, all items, train window positives
    (`ItemCounts`, summed per bundle), the user's numbers of train and test requests
    (tagged `offsets`) and, for exposure negatives, each request's time and window
    (tagged `exposure`)."""

    def __init__(self, config):
        self.config = config

    def start_bundle(self):
        self.counts = _Counts()

    def process(self, path, split):
        for element in read_timelines(path):
            yield from self._user(element, split)

    def _user(self, element, split):
        user, (item, time, bits) = element
        timeline = one_user_timeline(user, item, time, bits)
        train_events = time < split["time"]
        self.counts.train_events.add(item[train_events])
        self.counts.all_events.add(item)
        num_train = num_test = 0
        for point in user_requests.request_points(timeline, self.config):
            positives = user_requests.window_positives(point, timeline,
                                                       self.config.max_positives)[0]
            if point.time < split["time"]:
                num_train += 1
                self.counts.train_positives.add(positives)
            else:
                num_test += 1
            if self.config.negatives == "exposure":
                yield beam.pvalue.TaggedOutput("exposure", (user, point.time, positives))
        if num_train or num_test:
            yield beam.pvalue.TaggedOutput("offsets", (user, num_train, num_test))

    def finish_bundle(self):
        counts, self.counts = self.counts, None  # a runner keeps the DoFn after the bundle
        yield window.GlobalWindows.windowed_value(counts)


class _Counts:
    """The item counts `log_statistics.make_sampler` reads, as `UserStatistics` adds them."""

    def __init__(self):
        self.train_events = log_statistics.ItemCounts()
        self.all_events = log_statistics.ItemCounts()
        self.train_positives = log_statistics.ItemCounts()
        self.token = uuid.uuid4().hex  # tells a worker's cached sampler which counts it has

    def merge(self, other):
        self.train_events.merge(other.train_events)
        self.all_events.merge(other.all_events)
        self.train_positives.merge(other.train_positives)
        return self


def _offset_table(entries):
    """Each user's first request index in the train and in the test split: sorted users
    and the two running counts (requests go by user, then time, as in-process)."""
    entries = np.array(sorted(entries), np.int64).reshape(-1, 3)
    starts = np.cumsum(entries[:, 1:], axis=0) - entries[:, 1:]
    return {"users": entries[:, 0], "train": starts[:, 0], "test": starts[:, 1],
            "num_train": int(entries[:, 1].sum())}


def _exposure_inputs(entries):
    """`ExposureSampler`'s `(times, users, windows)`, requests by user then time."""
    entries = sorted(entries, key=lambda entry: entry[:2])
    return ([time for _, time, _ in entries], [user for user, _, _ in entries],
            [positives for _, _, positives in entries])


class BuildRequests(beam.DoFn):
    """A file of timelines (`WriteTimelines`) -> each user's requests: built
    (`user_requests.build_request`), encoded and written to temporary files of their
    shards; a request goes to the shard the in-process converter gives it (its index in
    its split, by user then time, modulo the split's shards). The main output is the
    path of a file of the bundle's test requests' audit entries (`leak_audit.test_entry`,
    a `PickleFile`); tagged outputs: the
    temporary files `((split, shard), (path, count))`, the split figures, the audit's
    train statistics and the negative sampler's fallbacks, per bundle."""

    def __init__(self, config, schema, num_shards, work):
        self.config, self.schema, self.num_shards = config, schema, num_shards
        self.work = work
        self._sampler = self._hashes = None

    def setup(self):
        self.rules = self.config.action_rules

    def start_bundle(self):
        self.writers = {}
        self.statistics = {}
        self.train = None
        self.tests = None
        self.fallbacks = 0

    def process(self, path, split, counts, offsets, exposure, item_category):
        for element in read_timelines(path):
            self._user(element, split, counts, offsets, exposure, item_category)

    def _user(self, element, split, counts, offsets, exposure, item_category):
        user, (item, time, bits) = element
        config = self.config
        timeline = one_user_timeline(user, item, time, bits)
        points = list(user_requests.request_points(timeline, config))
        if not points:
            return
        sampler = self._sampler_for(counts, exposure)
        before = sampler.fallbacks
        where = int(np.searchsorted(offsets["users"], user))
        next_index = {"train": int(offsets["train"][where]),
                      "test": int(offsets["test"][where])}
        shards = _shard_counts(split, self.num_shards)
        if self.train is None:
            self.train = leak_audit.TrainStatistics(*self._hashes_for(offsets["num_train"]),
                                                    leak_audit._DEFAULT_SKETCH_DIM)
        for point in points:
            window_ = user_requests.window_positives(point, timeline, config.max_positives)
            request = user_requests.build_request(point, window_, timeline, item_category,
                                                  sampler, self.schema, self.rules, config)
            name = "test" if point.time >= split["time"] else "train"
            index = next_index[name]
            next_index[name] += 1
            self._writer(name, index % shards[name]).write(
                records.encode_example(request, self.schema))
            self.statistics.setdefault(name, log_statistics.SplitStatistics()).add(
                len(request["seq_item_id"]), len(request["cand_item_id"]),
                request["impression"].sum(), window_[2])
            if name == "train":
                self.train.add(leak_audit.train_positives(request, self.schema.tasks[0]),
                               index)
            else:
                self._tests().write(leak_audit.test_entry(request, self.schema.tasks))
        self.fallbacks += sampler.fallbacks - before

    def finish_bundle(self):
        # Nothing of the bundle stays with the DoFn, which a runner keeps after the bundle.
        writers, statistics, train = self.writers, self.statistics, self.train
        tests, self.tests = self.tests, None
        self.writers, self.statistics, self.train = {}, {}, None
        self._sampler = self._hashes = None
        if tests is not None:
            yield window.GlobalWindows.windowed_value(tests.close())
        for key, (writer, path, count) in writers.items():
            writer.close()
            yield _tagged("files", (key, (path, count)))
        for name, figures in statistics.items():
            yield _tagged("statistics", (name, figures))
        if train is not None:
            yield _tagged("train", train)
        yield _tagged("fallbacks", self.fallbacks)

    def _tests(self):
        if self.tests is None:
            self.tests = PickleFile(FileSystems.join(self.work, "audit",
                                                     f"{uuid.uuid4().hex}.pickle"))
        return self.tests

    def _writer(self, split, shard):
        key = (split, shard)
        if key not in self.writers:
            import tensorflow as tf

            path = FileSystems.join(self.work, "records",
                                    f"{split}-{shard:05d}-{uuid.uuid4().hex}.tfrecord")
            self.writers[key] = [tf.io.TFRecordWriter(path), path, 0]
        entry = self.writers[key]
        entry[2] += 1
        return entry[0]

    def _sampler_for(self, counts, exposure):
        if self._sampler is None or self._sampler[0] != counts.token:
            positives = (counts.train_positives.result()
                         if len(counts.train_positives.result()[0]) else None)
            train = counts.train_events.result()
            popularity = train if len(train[0]) else counts.all_events.result()
            sampler = log_statistics.make_sampler(
                self.config, popularity, counts.all_events.result()[0], positives,
                exposure if self.config.negatives == "exposure" else None)
            self._sampler = (counts.token, sampler)
        return self._sampler[1]

    def _hashes_for(self, num_train):
        if self._hashes is None or self._hashes[0] != num_train:
            self._hashes = (num_train, leak_audit.sketch_hashes(
                self.config.seed, leak_audit._DEFAULT_SKETCH_DIM, num_train))
        return self._hashes[1]


def _tagged(tag, value):
    return beam.pvalue.TaggedOutput(tag, window.GlobalWindows.windowed_value(value))


class ConcatenateShard(beam.DoFn):
    """One shard's temporary files -> `<split>-<i>-of-<k>.tfrecord[.gz]` (a temporary name
    until it is whole); yields `(file name, records)`."""

    def __init__(self, output_dir, compression):
        self.output_dir, self.compression = output_dir, compression

    def process(self, element, split, num_shards):
        (name, shard), parts = element
        shards = _shard_counts(split, num_shards)[name]
        final = records.shard_filename(name, shard, shards, self.compression)
        path = FileSystems.join(self.output_dir, final)
        tmp_path = FileSystems.join(self.output_dir, records.TMP_PREFIX + final)
        total = 0
        with FileSystems.create(tmp_path, compression_type="uncompressed") as raw:
            out = (gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="",
                                 compresslevel=6) if self.compression == "gzip" else raw)
            for part_path, count in sorted(parts):
                with FileSystems.open(part_path, compression_type="uncompressed") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
                total += count
            if out is not raw:
                out.close()
        FileSystems.rename([tmp_path], [path])
        FileSystems.delete([p for p, _ in parts])
        yield final, total


# -------------------------------------------------------------------------------- audit
class ScoreTests(beam.DoFn):
    """A file of test requests' audit entries (`BuildRequests`) -> each one scored for the
    leak audit (`leak_audit.score_request`), with the train statistics as a side input. Main output: `AuditTotals` per bundle; tagged
    `histograms`: `((score, value range), ScoreHistogram)`, made whenever the worker holds
    `_FLUSH_SCORES` scores."""

    def __init__(self, tasks):
        self.tasks = tasks
        self._lookup = None

    def start_bundle(self):
        self.totals = leak_audit.AuditTotals(self.tasks)
        self.pending, self.held = {}, 0

    def process(self, path, train):
        if self._lookup is None or self._lookup[0] is not train:
            self._lookup = (train, train.lookup())
        for entry in read_pickled(path):
            yield from self._score(entry)

    def _score(self, entry):
        candidates, in_history, labels = entry
        scores = leak_audit.score_request(candidates, in_history, labels, self._lookup[1])
        self.totals.add(scores, labels)
        for name, values, counted in leak_audit.histogram_inputs(scores, labels):
            self.pending.setdefault(name, []).append(
                (values, leak_audit.label_matrix(self.tasks, counted, len(values))))
            self.held += len(values)
        if self.held >= _FLUSH_SCORES:
            yield from self._histograms(beam.pvalue.TaggedOutput)

    def finish_bundle(self):
        yield from self._histograms(_tagged)
        totals, self.totals, self._lookup = self.totals, None, None  # as in BuildRequests
        yield window.GlobalWindows.windowed_value(totals)

    def _histograms(self, tag):
        """The pending scores as one histogram per (score, value range)."""
        for name, entries in self.pending.items():
            values = np.concatenate([v for v, _ in entries])
            labels = np.concatenate([m for _, m in entries], axis=1)
            ranges = leak_audit.value_range(values, _SCORE_RANGE_BITS)
            order = np.argsort(ranges, kind="stable")
            found, starts = np.unique(ranges[order], return_index=True)
            for value_range, rows in zip(found.tolist(), np.split(order, starts[1:])):
                histogram = leak_audit.ScoreHistogram(self.tasks).add_matrix(
                    values[rows], labels[:, rows])
                histogram.terms()  # compacted before it travels
                yield tag("histograms", ((name, value_range), histogram))
        self.pending, self.held = {}, 0


# ---------------------------------------------------------------------------- combiners
class _MergeAll(beam.CombineFn):
    """Merges accumulators that have a `merge` method (`ItemCounts`, `_Counts`,
    `TrainStatistics`, `AuditTotals`, `ScoreHistogram`)."""

    def create_accumulator(self):
        return None

    def add_input(self, merged, value):
        return value if merged is None else merged.merge(value)

    def merge_accumulators(self, accumulators):
        merged = None
        for accumulator in accumulators:
            if accumulator is not None:
                merged = accumulator if merged is None else merged.merge(accumulator)
        return merged

    def extract_output(self, merged):
        return merged


def _merged(accumulators):
    return _MergeAll().merge_accumulators(accumulators)


class WriteSummary(beam.DoFn):
    """Writes one `(name, value)` of the pipeline's results for the driver to read."""

    def __init__(self, directory):
        self.directory = directory

    def process(self, element):
        path = FileSystems.join(self.directory, f"{element[0]}-{uuid.uuid4().hex}.pickle")
        with FileSystems.create(path, compression_type="uncompressed") as f:
            f.write(pickle.dumps(element, protocol=pickle.HIGHEST_PROTOCOL))

