"""`ifa-state`: per-user states of a stateful IFA (`time_encoding="decay"`) in a store.

Subcommands:
    build   make every user's state from TFRecords or an events CSV (after a new model
            version: states are keyed by the model's id, so the old version's stay)
    apply   add new events (a CSV) to the users' stored states
    show    one user's state: its model, events, reference time and age

    ifa-state build --model=models/ifa/3 --store=sqlite:///states.db \\
        --records='data/sim/train-*.tfrecord.gz' --now=1700000000
    ifa-state apply --model=models/ifa/3 --store=redis://cache:6379/0 --events=new.csv
    ifa-state show --model=models/ifa/3 --store=sqlite:///states.db --user=42

Events CSVs have the header `user_id,item_id,category_id,author_id,action,time` (int64
ids as the model was trained on, time in seconds). --model is a SavedModel version
directory written by ifa-export; the states are computed in-process by its signatures.
Thin over `ifa_tf.serving.state_store`.
"""

import json
import os
import time

from absl import app, flags

from ifa_tf.cli import run_app

COMMANDS = ("build", "apply", "show")

flags.DEFINE_string("model", None, "SavedModel version directory of the decay model.")
flags.DEFINE_string("store", "sqlite:///tmp/ifa_states.db",
                    "sqlite:///path/to/states.db (embedded) or redis://host:port/db.")
flags.DEFINE_string("records", None, "build: TFRecord file pattern (ifa-data output).")
flags.DEFINE_string("events", None, "build / apply: events CSV.")
flags.DEFINE_integer("now", None, "build --records: the time the records' seq_time_delta "
                     "counts back from (seconds; default the wall clock).")
flags.DEFINE_string("user", None, "show: the user's id.")
flags.DEFINE_integer("batch_size", 64, "Users per update_state call.")


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
    if command == "build" and (values.records is None) == (values.events is None):
        raise app.UsageError("build needs exactly one of --records and --events.")
    if command == "apply" and values.events is None:
        raise app.UsageError("apply needs --events.")
    if command == "show" and values.user is None:
        raise app.UsageError("show needs --user.")
    if values.events and not os.path.exists(values.events):
        raise FileNotFoundError(f"--events={values.events} does not exist.")


def run_command(command, values=flags.FLAGS, out=print):
    """Runs one subcommand; returns what it printed as a dict."""
    from ifa_tf.serving import state_store

    model = state_store.StateModel(export_dir=values.model)
    cross = _cross_features(values.model)
    with state_store.open_store(values.store) as store:
        if command == "show":
            record, _ = store.get(model.model, _user(values.user))
            result = ({"user": values.user, "known": False, "model": model.model}
                      if record is None else {"user": values.user, "known": True,
                                              **state_store.describe(record)})
        elif command == "build":
            events = (state_store.read_events(values.events) if values.events else
                      state_store.events_from_records(
                          values.records, values.now if values.now is not None
                          else int(time.time())))
            started = time.perf_counter()
            users = state_store.build_states(store, model, events, cross, values.batch_size)
            result = {"users": users, "model": model.model,
                      "seconds": round(time.perf_counter() - started, 2)}
        else:
            events = state_store.read_events(values.events)
            for user, user_events in events.items():
                state_store.apply_events(store, model, user, user_events, cross)
            result = {"users": len(events), "events": int(sum(
                len(e["seq_item_id"]) for e in events.values())), "model": model.model}
    out(json.dumps(result, sort_keys=True))
    return result


def _user(text):
    return int(text) if text.lstrip("-").isdigit() else text


def _cross_features(export_dir):
    from ifa_tf import export

    metadata = export.read_metadata(export_dir) or {}
    return tuple(metadata.get("schema", {}).get("cross_features", ()))


def main(argv):
    run_command(argv[1])


def run():
    run_app(main, __name__, "ifa-state", check=check)


if __name__ == "__main__":
    run()
