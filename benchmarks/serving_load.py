"""Load test of a served ranking model: concurrent clients, requests/s, p50/p99 latency, errors.

By default it exports a freshly built zoo model (default schema), starts `ifa-serve` on it
and measures each `--shapes` entry (m x n, one user per request):

    python benchmarks/serving_load.py --shapes=1000x1000,10000x10000 --clients=4 \\
        --duration_s=20 --markdown

`--target=host:port --model_name=NAME` measures a running server instead (TF Serving or
ifa-serve; gRPC and/or REST with --protocols). Latency is measured in the client: request
encoding, the call, response decoding and turning it into a ranked list.

A comparison in one run, so that other work on the machine weighs on every side alike:
`--bare` also measures the exported SavedModel called in-process by the same client threads
(its signature, then the same ranked lists: everything but the serving), and
`--baseline_checkout=DIR` also starts `ifa-serve` from another checkout of this repository
(`git archive <commit> | tar -x -C DIR`) on the same export. `--rounds` repeats the sides in
turn, each for --duration_s, and pools each side's requests:

    python benchmarks/serving_load.py --shapes=1000x1000 --protocols=rest,grpc --bare \\
        --baseline_checkout=/tmp/ifa_before --rounds=3 --duration_s=20 --markdown \\
        --output_json=benchmarks/results/serving_load/results.json
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values=flags.FLAGS):
    """Defines the benchmark's flags (at run time, so importing this file defines none)."""
    f = flag_values
    flags.DEFINE_string("target", "", "host:port of a running server; empty: start ifa-serve.",
                        flag_values=f)
    flags.DEFINE_string("model_name", "ifa", "Served model name.", flag_values=f)
    flags.DEFINE_string("model", "ifa", "Zoo model to export and serve when --target is empty.",
                        flag_values=f)
    flags.DEFINE_list("protocols", ["grpc"], "Client protocols, of grpc and rest.",
                      flag_values=f)
    flags.DEFINE_bool("bare", False, "Also measure the SavedModel called in-process.",
                      flag_values=f)
    flags.DEFINE_string("baseline_checkout", "", "Also measure ifa-serve run from this "
                        "checkout of the repository (the code before a change).",
                        flag_values=f)
    flags.DEFINE_integer("rounds", 1, "Times each side is measured, in turn.", flag_values=f)
    flags.DEFINE_list("shapes", ["1000x1000", "10000x10000"], "m x n of each measurement.",
                      flag_values=f)
    flags.DEFINE_integer("batch_size", 1, "Users per request.", flag_values=f)
    flags.DEFINE_integer("clients", 4, "Concurrent clients (threads, one channel each).",
                         flag_values=f)
    flags.DEFINE_float("duration_s", 20.0, "Measured seconds per shape.", flag_values=f)
    flags.DEFINE_float("warmup_s", 3.0, "Unmeasured seconds of load before each measurement.",
                       flag_values=f)
    flags.DEFINE_string("output_json", "", "Write the results here as JSON.", flag_values=f)
    flags.DEFINE_string("output_dir", "", "Write results.json and results.md (with the command "
                        "and the commit) here.", flag_values=f)
    flags.DEFINE_bool("markdown", False, "Print a Markdown table.", flag_values=f)
    flags.DEFINE_string("note", "", "A line about the conditions (other work on the machine), "
                        "kept in the JSON.", flag_values=f)


FLAGS = flags.FLAGS


@dataclasses.dataclass
class LoadResult:
    clients: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    error_codes: dict
    latencies_ms: list = dataclasses.field(default_factory=list, repr=False)

    def summary(self):
        """The result without its latencies, for JSON."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key != "latencies_ms"}


def run_load(make_client, features, clients, duration_s):
    """Runs `clients` threads calling `client.rank(features)` for `duration_s` seconds."""
    from ifa_tf.serving import ServingError

    latencies, error_codes, lock = [], {}, threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker():
        client = make_client()
        own_latencies, own_errors = [], {}
        start_barrier.wait()
        while time.monotonic() < deadline[0]:
            began = time.perf_counter()
            try:
                client.rank(features)
            except ServingError as error:
                own_errors[error.code.name] = own_errors.get(error.code.name, 0) + 1
                continue
            own_latencies.append(time.perf_counter() - began)
        client.close()
        with lock:
            latencies.extend(own_latencies)
            for code, count in own_errors.items():
                error_codes[code] = error_codes.get(code, 0) + count

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.monotonic() + duration_s
    began = time.monotonic()
    start_barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return _result(clients, elapsed, [t * 1e3 for t in latencies], error_codes)


def _result(clients, elapsed, latencies_ms, error_codes):
    milliseconds = np.asarray(latencies_ms)
    percentile = (lambda q: float(np.percentile(milliseconds, q))) if len(latencies_ms) else (
        lambda q: float("nan"))
    return LoadResult(
        clients=clients, duration_s=elapsed, requests=len(latencies_ms),
        errors=sum(error_codes.values()), requests_per_s=len(latencies_ms) / elapsed,
        p50_ms=percentile(50), p99_ms=percentile(99),
        mean_ms=float(milliseconds.mean()) if len(latencies_ms) else float("nan"),
        error_codes=error_codes, latencies_ms=list(latencies_ms))


def pooled(results):
    """One `LoadResult` of several measurements of a side: their requests over their time."""
    codes = {}
    for result in results:
        for code, count in result.error_codes.items():
            codes[code] = codes.get(code, 0) + count
    return _result(results[0].clients, sum(r.duration_s for r in results),
                   [t for r in results for t in r.latencies_ms], codes)


class BareModel:
    """The `serving_default` signature of an export, called in-process, behind the client's
    `rank` (the same ranked lists, from the same outputs): the model without the serving."""

    def __init__(self, export_dir):
        import tensorflow as tf

        self._tf = tf
        self._signature = tf.saved_model.load(export_dir).signatures["serving_default"]

    def rank(self, features):
        from ifa_tf.serving.client import rankings_from_outputs

        outputs = self._signature(**{key: self._tf.constant(value)
                                     for key, value in features.items()})
        return rankings_from_outputs({key: value.numpy() for key, value in outputs.items()},
                                     None)

    def close(self):
        pass


def _export(model_name, zoo_name, workdir):
    """Exports a fresh zoo model under `workdir/model_name`; returns the version directory."""
    import ifa_tf
    from ifa_tf import export

    return str(export.export_saved_model(ifa_tf.zoo.build(zoo_name),
                                         os.path.join(workdir, model_name)))


def _start_server(model_name, workdir, max_m, max_n, batch_size, checkout="",
                  label="ifa-serve"):
    """Starts ifa-serve (of `checkout`, another copy of this repository; empty: this one) on
    the export in `workdir`; returns (process, gRPC port, REST port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        rest_port = sock.getsockname()[1]
    # The largest request allowed, in all: B·m, B·n and its bytes (REST JSON takes 3-4x the
    # gRPC size of 8·B·(5n + 5m + 1) bytes).
    request_bytes = max(64 << 20, 32 * batch_size * (5 * max_n + 5 * max_m + 1))
    log = open(os.path.join(workdir, f"{label}.log"), "w")
    environment = dict(os.environ)
    if checkout:
        environment["PYTHONPATH"] = os.path.abspath(checkout)
    process = subprocess.Popen(
        [sys.executable, "-m", "ifa_tf.cli.serve", f"--port={port}",
         f"--rest_api_port={rest_port}", f"--model_name={model_name}",
         f"--model_base_path={os.path.join(workdir, model_name)}",
         f"--max_candidates={max_m}", f"--max_sequence_length={max_n}",
         f"--max_batch_size={batch_size}", f"--max_total_candidates={batch_size * max_m}",
         f"--max_total_sequence_length={batch_size * max_n}",
         f"--max_request_bytes={request_bytes}",
         # The flag's name before --max_bytes_in_flight, which both versions read.
         f"--rest_max_body_bytes_in_flight={request_bytes}"],
        stdout=log, stderr=subprocess.STDOUT, env=environment,
        cwd=os.path.abspath(checkout) if checkout else None)
    return process, port, rest_port


def _wait_ready(client, timeout=300):
    from ifa_tf.serving import ServingError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(state == "AVAILABLE" for _, state, _ in client.model_status(timeout=2)):
                return
        except ServingError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def main(argv):
    del argv
    import platform

    import tensorflow as tf

    from ifa_tf.benchmark.requests import random_request
    from ifa_tf.benchmark.runner import git_commit, script_command
    from ifa_tf.schema import default_schema
    from ifa_tf.serving import connect

    unknown = sorted(set(FLAGS.protocols) - {"grpc", "rest"})
    if unknown:
        raise app.UsageError(f"--protocols: unknown {unknown}; choose from grpc, rest")
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in FLAGS.shapes]
    max_m, max_n = max(m for m, _ in shapes), max(n for _, n in shapes)
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    processes = []
    sides = {}  # label -> {protocol: target}, or the bare model
    with tempfile.TemporaryDirectory() as workdir:
        try:
            if FLAGS.target:
                sides[FLAGS.target] = {protocol: FLAGS.target for protocol in FLAGS.protocols}
            else:
                export_dir = _export(FLAGS.model_name, FLAGS.model, workdir)
                servers = [("ifa-serve", "")]
                if FLAGS.baseline_checkout:
                    servers.insert(0, ("ifa-serve (baseline)", FLAGS.baseline_checkout))
                for label, checkout in servers:
                    process, port, rest_port = _start_server(
                        FLAGS.model_name, workdir, max_m, max_n, FLAGS.batch_size, checkout,
                        label.replace(" ", "_").replace("(", "").replace(")", ""))
                    processes.append(process)
                    sides[label] = {"grpc": f"127.0.0.1:{port}",
                                    "rest": f"127.0.0.1:{rest_port}"}
                if FLAGS.bare:
                    sides["bare SavedModel"] = BareModel(export_dir)
            for label, targets in sides.items():
                if not isinstance(targets, BareModel):
                    for protocol in FLAGS.protocols:
                        _wait_ready(connect(targets[protocol], FLAGS.model_name,
                                            protocol=protocol, timeout=60))

            def client_factory(label, protocol):
                targets = sides[label]
                if isinstance(targets, BareModel):
                    return lambda: targets
                return lambda: connect(targets[protocol], FLAGS.model_name, protocol=protocol,
                                       timeout=60)

            runs = [(label, protocol) for label in sides for protocol in (
                ["in-process"] if isinstance(sides[label], BareModel) else FLAGS.protocols)]
            rows = []
            for m, n in shapes:
                features = random_request(default_schema(), m, n, batch=FLAGS.batch_size)
                measured = {run: [] for run in runs}
                for run in runs:
                    run_load(client_factory(*run), features, FLAGS.clients, FLAGS.warmup_s)
                for _ in range(FLAGS.rounds):
                    for run in runs:
                        measured[run].append(run_load(client_factory(*run), features,
                                                      FLAGS.clients, FLAGS.duration_s))
                for (label, protocol), results in measured.items():
                    rows.append({"side": label, "protocol": protocol, "m": m, "n": n,
                                 "batch_size": FLAGS.batch_size, "rounds": len(results),
                                 **pooled(results).summary()})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
    report = {"command": script_command(__file__), "git_commit": git_commit(REPO),
              "model": FLAGS.model, "protocols": FLAGS.protocols,
              "baseline_checkout": FLAGS.baseline_checkout, "note": FLAGS.note,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"{len(tf.config.list_physical_devices('GPU'))} GPU",
              "load_average_1min_before": load_before,
              "load_average_1min_after": os.getloadavg()[0], "tensorflow": tf.__version__,
              "results": rows}
    outputs = [FLAGS.output_json] if FLAGS.output_json else []
    if FLAGS.output_dir:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        outputs.append(os.path.join(FLAGS.output_dir, "results.json"))
        with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
            f.write(f"# Serving load\n\nCommand: `{report['command']}`, at commit "
                    f"{report['git_commit']}.\n\n" + (f"{FLAGS.note}\n\n" if FLAGS.note else "")
                    + markdown(report, FLAGS) + "\n")
    for path in outputs:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if FLAGS.markdown:
        print(markdown(report, FLAGS))


def markdown(report, options):
    """The results as a Markdown table; with a bare row, each row's requests/s over it."""
    lines = [f"Model `{report['model']}`, {report['machine']} (1-min load average "
             f"{report['load_average_1min_before']:.1f} before the run, "
             f"{report['load_average_1min_after']:.1f} after), TF {report['tensorflow']}, "
             f"{options.clients} concurrent clients, batch {options.batch_size}, "
             f"{options.rounds} round(s) of {options.duration_s:g} s per side:", "",
             "| side | protocol | m | n | requests/s | vs bare | p50 ms | p99 ms | requests "
             "| errors |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bare = {(row["m"], row["n"]): row["requests_per_s"] for row in report["results"]
            if row["protocol"] == "in-process"}
    for row in report["results"]:
        base = bare.get((row["m"], row["n"]))
        ratio = f"{row['requests_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {row['side']} | {row['protocol']} | {row['m']:,} | {row['n']:,} | "
                     f"{row['requests_per_s']:.1f} | {ratio} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['requests']} | {row['errors']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    app.run(main)
