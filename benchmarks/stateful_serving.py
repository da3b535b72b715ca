"""Stateless against stateful IFA serving: request bytes, latency, throughput, update and
rebuild cost.

For m candidates and each n: a decay IFA (default schema, untrained: cost does not depend on
the weights) is exported once; `serving_default` gets the full request (the sequence),
`rank_with_state` the user's state instead. Timed in-process through the SavedModel's
signatures, as a server runs them (TF Serving's or ifa-serve's Predict adds the same
parsing to both, proportional to the request bytes reported). Throughput is one caller's
requests per second. `update_state` is timed for one event and for 100 events per call;
the rebuild writes 10k users' states (100 events each) into an SQLite store and is
extrapolated linearly to 1 million users.

    python benchmarks/stateful_serving.py --m=1000 --n_values=1000,10000,100000 \\
        --output=benchmarks/results/stateful_serving.md
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def timed(function, repeats, warmup=3):
    """Each call's time, milliseconds (`ifa_tf.benchmark.worker.time_samples`)."""
    from ifa_tf.benchmark.worker import time_samples

    return np.array(time_samples(function, repeats, warmup))


def summary(times_ms):
    return {"p50_ms": round(float(np.percentile(times_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(times_ms, 99)), 3),
            "throughput_per_s": round(1000.0 / float(np.mean(times_ms)), 1)}


def request_bytes(features, signature):
    from ifa_tf import export

    return export.make_predict_request(features, "ifa", signature).ByteSize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--n_values", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rebuild_users", type=int, default=10_000)
    parser.add_argument("--events_per_user", type=int, default=100)
    parser.add_argument("--output", default="benchmarks/results/stateful_serving.md")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    import ifa_tf
    from ifa_tf import export
    from ifa_tf.benchmark.requests import random_request
    from ifa_tf.schema import default_schema
    from ifa_tf.serving import state_store

    schema = default_schema()
    keras.utils.set_random_seed(0)
    model = ifa_tf.zoo.build("ifa", time_encoding="decay")
    work = tempfile.mkdtemp(prefix="stateful-bench-")
    export_dir = export.export_saved_model(model, os.path.join(work, "ifa"), schema=schema,
                                           warmup_shapes=())
    signatures = tf.saved_model.load(export_dir).signatures
    now = 1_700_000_000
    rows = []
    for n in (int(v) for v in args.n_values.split(",")):
        features = random_request(schema, args.m, n, batch=1, seed=n)
        features["seq_time_delta"] = np.sort(np.random.default_rng(n).integers(
            0, 365 * 86400, (1, n)))[:, ::-1].copy()
        stateless_tensors = {k: tf.constant(v) for k, v in features.items()}
        state = {k: v.numpy() for k, v in signatures["user_state"](
            **{k: v for k, v in stateless_tensors.items() if k.startswith("seq_")},
            now=tf.constant([now], tf.int64)).items()}
        stateful = {k: features[k] for k in model.rank_features}
        stateful.update(state)
        stateful["now"] = np.array([now + 60], np.int64)
        stateful_tensors = {k: tf.constant(v) for k, v in stateful.items()}
        for path, signature, inputs, tensors in (
                ("stateless", "serving_default", features, stateless_tensors),
                ("stateful", "rank_with_state", stateful, stateful_tensors)):
            times = timed(lambda: signatures[signature](**tensors), args.repeats)
            rows.append({"path": path, "m": args.m, "n": n,
                         "request_bytes": request_bytes(inputs, signature), **summary(times)})
            print(json.dumps(rows[-1]), flush=True)

    model_runner = state_store.StateModel(export_dir=export_dir)
    record = state_store.UserState.empty(model_runner.model, model_runner.state_shape,
                                         ["author_id", "category_id"])
    updates = {}
    for events_per_call in (1, args.events_per_user):
        events = random_request(schema, 1, events_per_call, batch=1, seed=events_per_call)
        events = {k: events[k][0] for k in model.event_features}
        events["seq_event_time"] = np.full(events_per_call, now, np.int64)
        times = timed(lambda: model_runner.update_state(record, events), args.repeats)
        updates[events_per_call] = summary(times)
        print(json.dumps({"update_state_events": events_per_call, **updates[events_per_call]}),
              flush=True)

    rng = np.random.default_rng(0)
    users = {}
    for user in range(args.rebuild_users):
        k = args.events_per_user
        users[user] = {"seq_item_id": rng.integers(1, 10**6, k),
                       "seq_category_id": rng.integers(1, 1000, k),
                       "seq_author_id": rng.integers(1, 10**5, k),
                       "seq_action": rng.integers(0, 8, k),
                       "seq_event_time": np.sort(rng.integers(now - 10**7, now, k))}
    store_path = os.path.join(work, "states.db")
    with state_store.open_store(store_path) as store:
        start = time.perf_counter()
        state_store.build_states(store, model_runner, users, schema.cross_features)
        rebuild_s = time.perf_counter() - start
    rebuild = {"users": args.rebuild_users, "events_per_user": args.events_per_user,
               "seconds": round(rebuild_s, 1),
               "users_per_s": round(args.rebuild_users / rebuild_s, 1),
               "extrapolated_1m_users_minutes": round(rebuild_s * 1e6 / args.rebuild_users
                                                      / 60, 1),
               "store_mb": round(os.path.getsize(store_path) / 1e6, 1)}
    print(json.dumps(rebuild), flush=True)
    write_results(args, rows, updates, rebuild, model_runner.state_shape)


def write_results(args, rows, updates, rebuild, state_shape):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    command = " ".join(["python", *sys.argv])
    lines = [
        "# Stateless against stateful IFA serving",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit}{' (with uncommitted changes)' if dirty else ''}`; "
        f"machine: {os.cpu_count()} CPU cores, in-process SavedModel signatures "
        "(the server's compute, without gRPC), one caller.",
        f"State: {' x '.join(map(str, state_shape))} float32 per user "
        f"({int(np.prod(state_shape)) * 4} bytes) plus its time and model id.",
        "",
        "| path | m | n | request bytes | p50 ms | p99 ms | requests/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['path']} | {row['m']:,} | {row['n']:,} | "
                     f"{row['request_bytes']:,} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['throughput_per_s']} |")
    lines += ["", "| update_state, events per call | p50 ms | p99 ms | calls/s |",
              "|---:|---:|---:|---:|"]
    for events, figures in updates.items():
        lines.append(f"| {events} | {figures['p50_ms']} | {figures['p99_ms']} | "
                     f"{figures['throughput_per_s']} |")
    lines += ["", f"Rebuild: {rebuild['users']:,} users x {rebuild['events_per_user']} "
              f"events into SQLite in {rebuild['seconds']} s ({rebuild['users_per_s']} "
              f"users/s, {rebuild['store_mb']} MB); 1 million users extrapolated: "
              f"{rebuild['extrapolated_1m_users_minutes']} minutes on this machine "
              "(linear: one batched update_state call per 64 users, one write per user).",
              ""]
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"command": command, "commit": commit, "rows": rows,
                   "update_state": updates, "rebuild": rebuild}, f, indent=2)


if __name__ == "__main__":
    main()
