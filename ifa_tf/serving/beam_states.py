"""`ifa-state build --runner=... --log=...`: users' states rebuilt by an Apache Beam
pipeline's workers.

The raw log is read and mapped as `state_store.events_from_log` reads it in-process, by the
converter's pipeline steps (`beam_pipeline.ReadFile`: the parser of
`state_store.log_source`, with its rules on malformed rows and event times, and the
converter's id rule; `user_timelines`: its merge of rows of one (user, item, time), in
groups of users, into files of timelines; each item's first category), and each user's whole
timeline becomes the events of a state (`user_requests.sequence_events`). Batches of users
then go to the workers, which load the SavedModel once each (`DoFn.setup`), compute the
states with its `update_state` signature (`state_store.build_states`) and write them to the
store: SQLite on this machine (one file the local workers share), Redis for a cluster's
workers.
"""

import os

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from ifa_tf.data import beam_pipeline, log_converter, user_requests
from ifa_tf.serving import state_store


def build_states_from_log(store_url, export_dir, log, dataset, cross_features=(),
                          batch_size=64, options=None, run_context=None,
                          skip_bad_rows=False):
    """Builds the state of every user of the raw `log` (a file, a `.gz` file or a glob), in
    the format the converter read for `dataset`, with the SavedModel at `export_dir`, into
    the store at `store_url`. The log is read by `state_store.log_source`'s rules, as
    `events_from_log` reads it: malformed rows, and rows whose time no event can have, fail
    the run naming the file and lines, or are skipped and counted with `skip_bad_rows`.
    Each state records the log as applied (`state_store.batch_id`), as the in-process
    build does. Returns `{"users", "model": the model's id, "skipped_rows"}`. `options`,
    `run_context`: as in `beam_pipeline.convert_log`."""
    source = os.fspath(log)
    log, builder, parser = state_store.log_source(source, dataset, skip_bad_rows)
    config = parser.config
    files = beam_pipeline.match_files(log)
    batch = (state_store.batch_id(source) if "://" not in source else state_store.batch_id(
        source, files, lambda path: FileSystems.open(path, compression_type="uncompressed")))
    schema = builder.schema
    pipeline = beam.Pipeline(options=options or beam_pipeline.default_options())
    read = (pipeline
            | "Files" >> beam.Create(list(enumerate(files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(beam_pipeline.ReadFile(
                parser, log_converter.id_roles(config))).with_outputs(
                    "ids", "categories", "bad", main="events"))
    item_category = beam_pipeline.category_table(read.categories)
    work = beam_pipeline.temporary_directory(pipeline.options)
    stored = beam_pipeline.user_timelines(read.events, config, work,
                                          beam_pipeline.user_groups(files, pipeline.options))
    written = (stored
               | "Events" >> beam.FlatMap(_file_events, schema,
                                          beam.pvalue.AsSingleton(item_category))
               | "Batches" >> beam.BatchElements(min_batch_size=batch_size,
                                                 max_batch_size=batch_size)
               | "States" >> beam.ParDo(WriteStates(export_dir, store_url, cross_features,
                                                    batch_size, batch)))
    summary = beam_pipeline.SummaryFiles(FileSystems.join(work, "summary"))
    summary.add("written", written | "Total" >> beam.CombinePerKey(sum)
                | "AllModels" >> beam.combiners.ToList())
    summary.add("bad", read.bad | "BadRows" >> beam.Map(lambda bad: bad[1])
                | "SumBadRows" >> beam.CombineGlobally(sum))
    try:
        beam_pipeline.run(pipeline, run_context)
        found = summary.read()
    finally:
        beam_pipeline.remove(work)
    totals = found["written"][0]
    models = {model for model, _ in totals}
    return {"users": int(sum(count for _, count in totals)),
            "model": models.pop() if len(models) == 1 else sorted(models),
            "skipped_rows": int(found["bad"][0])}


def _file_events(stored, schema, item_category):
    """A file of users' timelines (`beam_pipeline.user_timelines`) -> each user's
    `(user, events)`."""
    for user, (item, time, bits) in beam_pipeline.read_timelines(stored.path):
        timeline = beam_pipeline.one_user_timeline(user, item, time, bits)
        yield user, user_requests.sequence_events(timeline, slice(0, len(item)),
                                                  item_category, schema,
                                                  state_store.EVENT_TIME)


class WriteStates(beam.DoFn):
    """Batches of `(user, events)` -> their states in the store (`state_store.build_states`),
    with the SavedModel loaded once per worker; yields `(model id, users written)`."""

    def __init__(self, export_dir, store_url, cross_features, batch_size, batch=None):
        self.export_dir, self.store_url = export_dir, store_url
        self.cross_features, self.batch_size = tuple(cross_features), batch_size
        self.batch = batch

    def setup(self):
        self.model = state_store.StateModel(export_dir=self.export_dir)
        self.store = state_store.open_store(self.store_url)

    def process(self, batch):
        events = {int(user): {k: np.asarray(v) for k, v in columns.items()}
                  for user, columns in batch}
        state_store.build_states(self.store, self.model, events, self.cross_features,
                                 self.batch_size, batch=self.batch)
        yield self.model.model, len(events)

    def teardown(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
