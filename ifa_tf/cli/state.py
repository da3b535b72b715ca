"""`ifa-state`: per-user states of a stateful IFA (`time_encoding="decay"`) in a store.

Subcommands:
    build   make every user's state from TFRecords, a raw log or an events CSV (after a new
            model version: states are keyed by the model's id, so the old version's stay)
    apply   add new events (a raw log or an events CSV) to the users' stored states
    show    one user's state: its model, events, reference time and age

    ifa-state build --model=models/ifa/3 --store=sqlite:///states.db \\
        --records='data/sim/train-*.tfrecord.gz' --now=1700000000
    ifa-state build --model=models/ifa/3 --store=sqlite:///states.db \\
        --log=log.csv --dataset=data/log
    ifa-state build --model=models/ifa/3 --store=redis://cache:6379/0 \\
        --log='logs/*.csv.gz' --dataset=data/log --runner=DataflowRunner \\
        --pipeline_options='--project=p --region=r --temp_location=gs://b/tmp'
    ifa-state apply --model=models/ifa/3 --store=redis://cache:6379/0 --events=new.csv
    ifa-state apply --model=models/ifa/3 --store=sqlite:///states.db \\
        --log=today.csv --dataset=data/log
    ifa-state show --model=models/ifa/3 --store=sqlite:///states.db --user=42
    ifa-state show --model=models/ifa/3 --store=sqlite:///states.db --user=alice \\
        --dataset=data/log

--log is a raw interaction log in the format `ifa-data from-log` read to write --dataset
(string ids allowed; the same columns, delimiter, header, actions and item table, read
from the dataset's metadata.json), mapped to ids exactly as that converter mapped them.
Every event of the log goes into the state (no max_seq_len cut). States are keyed by the
converter's int64 user id; with --dataset, `show --user` takes the raw user id, and show
lists the state's most frequent categories (and other table ids) as the log names them.

Events CSVs have the header `user_id,item_id,category_id,author_id,action,time` (int64
ids as the model was trained on, time in seconds; columns of attributes the model lacks
may be left out). --model is a SavedModel version directory written by ifa-export; the
states are computed in-process by its signatures. Thin over `ifa_tf.serving.state_store`.

Times are int64 seconds from 1970 to 2106 ([0, 2^32 - 1]) and no more than 5 minutes
after this machine's clock: a row with another time (milliseconds, the far future, a
negative one) is refused like any malformed row, with its line number, or skipped and
logged with --skip_bad_rows (or when the dataset's converter skipped malformed rows).

`apply` is safe to re-run: each user's record keeps the ids of the last 32 batches applied
to it (a batch is the --events or --log file, by its content), written with the events in
one atomic write. Running the same command again after a crash skips the users the first
run reached ("skipped_users") and applies the rest: no event counts twice. A file with
more events appended is a new batch: write new events to a new file. `build` from a file
records it too, so applying the file a state was built from adds nothing.

The store is opened and checked first, before the model loads; what is wrong with it (not
a state store, a directory, a missing directory, a read-only or full disk, Redis down) is
one line naming it.

With --runner (build --log), Apache Beam's workers build them instead, each loading the
SavedModel once (`ifa_tf.serving.beam_states`; --runner and --pipeline_options as
`ifa_tf.cli.beam_flags` describes them, `pip install 'ifa_tf[beam]'`).
"""

import glob
import json
import os
import re
import time

from absl import app, flags

from ifa_tf.cli import beam_flags, run_app

COMMANDS = ("build", "apply", "show")

flags.DEFINE_string("model", None, "SavedModel version directory of the decay model.")
flags.DEFINE_string("store", "sqlite:///tmp/ifa_states.db",
                    "sqlite:///path/to/states.db (embedded) or redis://host:port/db.")
flags.DEFINE_string("records", None, "build: TFRecord file pattern (ifa-data output).")
flags.DEFINE_string("events", None, "build / apply: events CSV (int64 ids).")
flags.DEFINE_string("log", None, "build / apply: a raw interaction log (string ids allowed) "
                    "in the format ifa-data from-log read for --dataset.")
flags.DEFINE_string("dataset", None, "The directory ifa-data from-log wrote (its "
                    "metadata.json gives --log's format and id mapping); with it, show "
                    "--user is a raw user id.")
flags.DEFINE_integer("now", None, "build --records: the time the records' seq_time_delta "
                     "counts back from (seconds; default the wall clock).")
flags.DEFINE_string("user", None, "show: the user's id.")
flags.DEFINE_integer("batch_size", 64, "Users per update_state call.")
flags.DEFINE_boolean("skip_bad_rows", False, "build / apply: skip malformed events (each "
                     "logged with its line number) instead of refusing the file: fields "
                     "that are not integers, times outside 1970-2106 or in the future.")
beam_flags.define_flags()  # build --log --runner=...: on Apache Beam's workers


def check(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Expected one subcommand of {list(COMMANDS)}. Received: "
                             f"{argv[1:]}")
    values = flags.FLAGS
    if not values.model:
        raise app.UsageError("--model is required: a SavedModel version directory.")
    if not os.path.isdir(values.model):
        raise FileNotFoundError(f"--model={values.model} is not a directory.")
    command = argv[1]
    sources = [name for name in ("records", "events", "log")
               if getattr(values, name) is not None]
    if command == "build" and len(sources) != 1:
        raise app.UsageError("build needs exactly one of --records, --events and --log. "
                             f"Received: {sources}")
    if command == "apply" and sorted(sources) not in (["events"], ["log"]):
        raise app.UsageError("apply needs exactly one of --events and --log. Received: "
                             f"{sources}")
    if command == "show" and values.user is None:
        raise app.UsageError("show needs --user.")
    beam_flags.check(values)
    if values.runner is not None and (command != "build" or values.log is None):
        raise app.UsageError("--runner builds states from a raw log: build --log=... "
                             "--dataset=... (other sources and commands run in-process).")
    if values.log is not None and values.dataset is None:
        raise app.UsageError("--log needs --dataset: the directory ifa-data from-log wrote "
                             "from a log of this format (it says how to read and map it).")
    for name in ("events", "log", "dataset"):
        path = getattr(values, name)
        if path is None or os.path.exists(path):
            continue
        if name == "log" and (glob.glob(path) or ("://" in path and values.runner)):
            continue  # a glob of files; a cluster's file system, which Beam's workers read
        raise FileNotFoundError(f"--{name}={path} does not exist"
                                + (", and no file matches it." if name == "log" else "."))
    from ifa_tf.serving import state_store

    if values.now is not None and command == "build":
        problem = state_store.event_time_problem(values.now)
        if problem:
            raise app.UsageError(f"--now={values.now}: {problem}")
    # Opened and checked here, before TensorFlow and the model load: a store that cannot be
    # used answers at once.
    state_store.open_store(values.store).close()


def run_command(command, values=flags.FLAGS, out=print, model=None):
    """Runs one subcommand; returns what it printed as a dict. `model`: the `StateModel`
    of `values.model` when already loaded."""
    from ifa_tf.serving import state_store

    if command == "build" and getattr(values, "runner", None) is not None:
        return _build_on_beam(values, out)
    # The store first: a store that cannot be used is reported before the model loads.
    with state_store.open_store(values.store) as store:
        model = model or state_store.StateModel(export_dir=values.model)
        schema = _schema(values.model)
        cross = schema.cross_features if schema else ()
        if command == "show":
            key = _user(values.user, values.dataset)
            record, _ = store.get(model.model, key)
            result = ({"user": values.user, "key": key, "known": False, "model": model.model}
                      if record is None else {"user": values.user, "key": key, "known": True,
                                              **state_store.describe(record)})
            if record is not None and values.dataset is not None:
                result["top"] = _raw_tables(record, values.dataset)
        elif command == "build":
            started = time.perf_counter()
            skipped = []
            users = state_store.build_states(store, model, _events(values, schema, skipped),
                                             cross, values.batch_size, batch=_batch(values))
            result = {"users": users, "model": model.model, "skipped_rows": len(skipped),
                      "seconds": round(time.perf_counter() - started, 2)}
        else:
            skipped = []
            events = _events(values, schema, skipped)
            counts = state_store.apply_batch(store, model, events, _batch(values), cross)
            result = {**counts, "model": model.model, "skipped_rows": len(skipped)}
    out(json.dumps(result, sort_keys=True))
    return result


def _build_on_beam(values, out):
    """build --log as an Apache Beam pipeline: the SavedModel loaded once per worker
    (`ifa_tf.serving.beam_states`)."""
    with beam_flags.quiet_beam():
        from ifa_tf.serving import beam_states
    schema = _schema(values.model)
    started = time.perf_counter()
    result = beam_states.build_states_from_log(
        values.store, values.model, values.log, values.dataset,
        schema.cross_features if schema else (), values.batch_size,
        options=beam_flags.pipeline_options(values.runner, values.pipeline_options),
        run_context=beam_flags.quiet_workers,
        skip_bad_rows=getattr(values, "skip_bad_rows", False))
    result["seconds"] = round(time.perf_counter() - started, 2)
    out(json.dumps(result, sort_keys=True))
    return result


def _events(values, schema, skipped):
    """`{user: events}` of build / apply from the one source flag given; `skipped` receives
    `(line, reason)` of the malformed rows skipped."""
    from ifa_tf.serving import state_store

    skip = getattr(values, "skip_bad_rows", False)
    if values.log is not None:
        return state_store.events_from_log(values.log, values.dataset, skip, skipped)
    if values.events is not None:
        return state_store.read_events(values.events, schema, skip, skipped)
    return state_store.events_from_records(
        values.records, values.now if values.now is not None else int(time.time()))


def _batch(values):
    """The id of the batch of build / apply: its --log or --events file's content
    (`state_store.batch_id`); None for --records."""
    from ifa_tf.serving import state_store

    source = values.log if values.log is not None else values.events
    return None if source is None else state_store.batch_id(source)


def _user(text, dataset=None):
    """The store key of `--user`: with --dataset, the converter's id of a raw user id; an
    integer in ASCII digits is that integer (not "²", nor "١٢٣" read as 123: those are
    names, as is any other text)."""
    if dataset is not None:
        from ifa_tf.data import log_converter

        return int(log_converter.encode_ids([text.strip()])[0][0])
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else text


def _raw_tables(record, dataset, top=10):
    """`{role: [[raw id, count, last event time], ...]}`: each table's `top` ids by count,
    in the log's own ids (the dataset's vocabularies)."""
    from ifa_tf.data import log_converter

    shown = {}
    for attribute, table in record.tables.items():
        role = attribute[:-len("_id")]
        path = os.path.join(dataset, f"vocab_{role}.tsv")
        names = log_converter.read_vocabulary(dataset, role) if os.path.exists(path) else {}
        ranked = sorted(table.items(), key=lambda entry: (-entry[1][0], entry[0]))[:top]
        shown[role] = [[names.get(i, str(i)), count, last] for i, (count, last) in ranked]
    return shown


def _schema(export_dir):
    """The model's `FeatureSchema`, recorded by ifa-export (None in an older export)."""
    from ifa_tf import export
    from ifa_tf import schema as schema_lib

    recorded = (export.read_metadata(export_dir) or {}).get("schema")
    return schema_lib.FeatureSchema.from_dict(recorded) if recorded else None


def main(argv):
    run_command(argv[1])


def run():
    run_app(main, __name__, "ifa-state", check=check)


if __name__ == "__main__":
    run()
