"""What one request costs `ifa-serve` in memory, at the shapes its default limits allow.

Exports a freshly built `ifa` (default schema) and, for each `--shapes` entry (B x m x n),
starts a fresh `ifa-serve` with its default limits, sends one warm-up request, resets the
server's peak RSS (VmHWM, through /proc/<pid>/clear_refs) and sends the measured request
over gRPC. It records whether the server answered or refused it and how far the request
raised the peak RSS. The request carries random ids (every value sent, in tensor_content),
so protobuf parsing, the arrays and the model's activations all count. Linux only.

    python benchmarks/serving_memory.py --output_dir=benchmarks/results/serving_memory

The default shapes are those `serving/README.md` quotes: both totals (B·m = 200,000,
B·n = 1,000,000) at the largest n (B = 10), at B = 200 and at the largest B (1,000); the
largest m and n of one user (B = 2); B alone at its bound; and the request of issue 24
(B = 200,000, m = n = 1), which the default --max_batch_size now refuses.
"""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = ["10x20000x100000", "200x1000x5000", "1000x200x1000", "2x100000x100000",
                  "1000x1x1", "200000x1x1"]


def define_flags(flag_values=flags.FLAGS):
    f = flag_values
    flags.DEFINE_list("shapes", DEFAULT_SHAPES, "B x m x n of each measured request.",
                      flag_values=f)
    flags.DEFINE_string("output_dir", "", "Where results.json and results.md go; empty: "
                        "print only.", flag_values=f)
    flags.DEFINE_string("note", "", "A line about the conditions (e.g. other work running), "
                        "written into results.md.", flag_values=f)
    flags.DEFINE_integer("timeout_s", 600, "Longest wait for one request.", flag_values=f)


FLAGS = flags.FLAGS


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def _reset_peak_rss(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _request(schema, batch, m, n, seed):
    """A PredictRequest of random ids, every value on the wire."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    rng = np.random.default_rng(seed)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ifa"
    for name in schema.feature_names:
        shape = (batch,) if schema.rank(name) == 1 else (
            batch, n if name in schema.sequence_features else m)
        values = rng.integers(1, 1_000_000, size=shape, dtype=np.int64)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return request


def measure(base, schema, batch, m, n, timeout_s, log_path):
    """`{answered, error, request_mb, peak_growth_mb, seconds}` of one request to a fresh
    server."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    port = _free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ifa_tf.cli.serve", f"--port={port}", "--model_name=ifa",
             f"--model_base_path={base}", "--file_system_poll_wait_seconds=0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        warm = _request(schema, 1, 8, 16, seed=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                stub.Predict(warm, timeout=30)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"ifa-serve did not answer; see {log_path}") from None
                time.sleep(0.5)
        request = _request(schema, batch, m, n, seed=1)
        _reset_peak_rss(process.pid)
        before = _peak_rss(process.pid)
        began = time.monotonic()
        try:
            stub.Predict(request, timeout=timeout_s)
            answered, error = True, ""
        except grpc.RpcError as rpc_error:
            answered, error = False, f"{rpc_error.code().name}: {rpc_error.details()}"
        seconds = time.monotonic() - began
        growth = _peak_rss(process.pid) - before
        return {"batch": batch, "m": m, "n": n, "answered": answered, "error": error,
                "request_mb": round(request.ByteSize() / 1e6, 1),
                "peak_growth_mb": round(growth / 1e6, 1), "seconds": round(seconds, 1)}
    finally:
        channel.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def markdown(rows, header):
    lines = [header, "", "| B | m | n | request | answer | peak RSS growth | time |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        answer = "answered" if row["answered"] else row["error"].split(":")[0] + " (refused)"
        lines.append(f"| {row['batch']:,} | {row['m']:,} | {row['n']:,} | "
                     f"{row['request_mb']:.1f} MB | {answer} | {row['peak_growth_mb']:,.0f} MB | "
                     f"{row['seconds']:.1f} s |")
    return "\n".join(lines)


def main(argv):
    del argv
    import keras
    import tensorflow as tf
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # not TensorFlow's export info lines

    import ifa_tf
    from ifa_tf import export
    from ifa_tf.benchmark.runner import git_commit, script_command
    from ifa_tf.schema import default_schema

    shapes = [tuple(int(d) for d in shape.split("x")) for shape in FLAGS.shapes]
    schema = default_schema()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serving_memory_") as workdir:
        keras.utils.set_random_seed(0)
        base = os.path.join(workdir, "ifa")
        export.export_saved_model(ifa_tf.zoo.build("ifa", schema=schema), base, schema=schema)
        rows = []
        for batch, m, n in shapes:
            row = measure(base, schema, batch, m, n, FLAGS.timeout_s,
                          os.path.join(workdir, f"serve-{batch}x{m}x{n}.log"))
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = script_command(__file__)
    header = (f"Model `ifa` (default schema), gRPC, one request per fresh `ifa-serve` with its "
              f"default limits; {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"TF {tf.__version__}, 1-min load average {load_before:.1f} before the run.")
    table = markdown(rows, header)
    print(table)
    if FLAGS.output_dir:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        commit = git_commit(REPO)
        with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
            json.dump({"command": command, "git_commit": commit, "rows": rows,
                       "load_average_1min": load_before, "note": FLAGS.note}, f, indent=2)
            f.write("\n")
        with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
            f.write(f"# Memory of one `ifa-serve` request\n\nCommand: `{command}`, at commit "
                    f"{commit}.\n\n" + (f"{FLAGS.note}\n\n" if FLAGS.note else "")
                    + table + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
