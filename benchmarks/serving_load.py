"""Load test of a served ranking model: concurrent clients, requests/s, p50/p99 latency, errors.

By default it exports a freshly built zoo model (default schema), starts `ifa-serve` on it
and measures each `--shapes` entry (m x n, one user per request):

    python benchmarks/serving_load.py --shapes=1000x1000,10000x10000 --clients=4 \\
        --duration_s=20 --markdown

`--target=host:port --model_name=NAME` measures a running server instead (TF Serving or
ifa-serve; gRPC or REST with --protocol). Latency is measured in the client: request
encoding, the call, response decoding and turning it into a ranked list.
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


def define_flags(flag_values=flags.FLAGS):
    """Defines the benchmark's flags (at run time, so importing this file defines none)."""
    f = flag_values
    flags.DEFINE_string("target", "", "host:port of a running server; empty: start ifa-serve.",
                        flag_values=f)
    flags.DEFINE_string("model_name", "ifa", "Served model name.", flag_values=f)
    flags.DEFINE_string("model", "ifa", "Zoo model to export and serve when --target is empty.",
                        flag_values=f)
    flags.DEFINE_enum("protocol", "grpc", ["grpc", "rest"], "Client protocol.", flag_values=f)
    flags.DEFINE_list("shapes", ["1000x1000", "10000x10000"], "m x n of each measurement.",
                      flag_values=f)
    flags.DEFINE_integer("batch_size", 1, "Users per request.", flag_values=f)
    flags.DEFINE_integer("clients", 4, "Concurrent clients (threads, one channel each).",
                         flag_values=f)
    flags.DEFINE_float("duration_s", 20.0, "Measured seconds per shape.", flag_values=f)
    flags.DEFINE_float("warmup_s", 3.0, "Unmeasured seconds of load before each measurement.",
                       flag_values=f)
    flags.DEFINE_string("output_json", "", "Write the results here as JSON.", flag_values=f)
    flags.DEFINE_bool("markdown", False, "Print a Markdown table.", flag_values=f)


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
    milliseconds = np.asarray(latencies) * 1e3
    percentile = (lambda q: float(np.percentile(milliseconds, q))) if len(latencies) else (
        lambda q: float("nan"))
    return LoadResult(
        clients=clients, duration_s=elapsed, requests=len(latencies),
        errors=sum(error_codes.values()), requests_per_s=len(latencies) / elapsed,
        p50_ms=percentile(50), p99_ms=percentile(99),
        mean_ms=float(milliseconds.mean()) if len(latencies) else float("nan"),
        error_codes=error_codes)


def _start_server(model_name, zoo_name, workdir, max_m, max_n, batch_size):
    """Exports a fresh zoo model and starts ifa-serve on it; returns (process, gRPC port,
    REST port)."""
    import socket

    import ifa_tf
    from ifa_tf import export

    model = ifa_tf.zoo.build(zoo_name)
    export.export_saved_model(model, os.path.join(workdir, model_name))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        rest_port = sock.getsockname()[1]
    # The largest request allowed, in all: B·m, B·n and its bytes (REST JSON takes 3-4x the
    # gRPC size of 8·B·(5n + 5m + 1) bytes).
    request_bytes = max(64 << 20, 32 * batch_size * (5 * max_n + 5 * max_m + 1))
    log = open(os.path.join(workdir, "ifa-serve.log"), "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "ifa_tf.cli.serve", f"--port={port}",
         f"--rest_api_port={rest_port}", f"--model_name={model_name}",
         f"--model_base_path={os.path.join(workdir, model_name)}",
         f"--max_candidates={max_m}", f"--max_sequence_length={max_n}",
         f"--max_batch_size={batch_size}", f"--max_total_candidates={batch_size * max_m}",
         f"--max_total_sequence_length={batch_size * max_n}",
         f"--max_request_bytes={request_bytes}",
         f"--rest_max_body_bytes_in_flight={request_bytes}"],
        stdout=log, stderr=subprocess.STDOUT)
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
    from ifa_tf.schema import default_schema
    from ifa_tf.serving import connect

    shapes = [tuple(int(d) for d in shape.split("x")) for shape in FLAGS.shapes]
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    process = None
    target = FLAGS.target
    with tempfile.TemporaryDirectory() as workdir:
        if not target:
            process, port, rest_port = _start_server(
                FLAGS.model_name, FLAGS.model, workdir, max(m for m, _ in shapes),
                max(n for _, n in shapes), FLAGS.batch_size)
            target = f"127.0.0.1:{port if FLAGS.protocol == 'grpc' else rest_port}"
        try:
            def make_client():
                return connect(target, FLAGS.model_name, protocol=FLAGS.protocol, timeout=60)

            _wait_ready(make_client())
            rows = []
            for m, n in shapes:
                features = random_request(default_schema(), m, n, batch=FLAGS.batch_size)
                run_load(make_client, features, FLAGS.clients, FLAGS.warmup_s)
                result = run_load(make_client, features, FLAGS.clients, FLAGS.duration_s)
                rows.append({"m": m, "n": n, "batch_size": FLAGS.batch_size,
                             **dataclasses.asdict(result)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=120)
    report = {"command": " ".join(sys.argv), "model": FLAGS.model, "protocol": FLAGS.protocol,
              "server": "ifa-serve" if not FLAGS.target else FLAGS.target,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"{len(tf.config.list_physical_devices('GPU'))} GPU",
              "load_average_1min_before": load_before, "tensorflow": tf.__version__,
              "results": rows}
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if FLAGS.markdown:
        print(f"\nModel `{FLAGS.model}`, {FLAGS.protocol}, {report['machine']} (1-min load "
              f"average {load_before:.1f} before the run), TF {tf.__version__}, "
              f"{FLAGS.clients} concurrent clients, {FLAGS.duration_s:g} s per shape, "
              f"batch {FLAGS.batch_size}:\n")
        print("| m | n | requests/s | p50 ms | p99 ms | requests | errors |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['m']:,} | {row['n']:,} | {row['requests_per_s']:.1f} | "
                  f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['requests']} | "
                  f"{row['errors']} |")


if __name__ == "__main__":
    define_flags()
    app.run(main)
