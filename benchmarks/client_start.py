"""How long a cold process takes to get one ranked list from a warm server.

An untrained IFA (default schema; cost does not depend on the weights) is exported and
served by `ifa-serve` (gRPC and REST). Each case then starts a fresh Python process, `repeats`
times, and times it from start to exit (what a user waits for), plus the import alone:

- `ifa-query --protocol=rest` / `--protocol=grpc` (the console script, a random request of
  m = 50, n = 500);
- a one-line Python client: `from ifa_tf.serving import RestClient` (or `GrpcClient`), one
  `rank` of the same request;
- for reference, `import tensorflow` alone: what every client paid before it stopped loading
  TensorFlow.

    python benchmarks/client_start.py --output_dir=benchmarks/results/client_start
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_CLIENT = """
import numpy as np
from ifa_tf.serving import {client}
from ifa_tf.serving.query import random_request
from ifa_tf.schema import default_schema
with {client}("{target}", "ifa") as client:
    ranking = client.rank(random_request(default_schema(), 50, 500))[0]
import sys
from ifa_tf import _deferred
print(len(ranking.item_ids), _deferred.is_loaded("tensorflow"))
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_process(argv, env):
    """Seconds from start to exit of a fresh process, and its stdout (it must succeed)."""
    started = time.perf_counter()
    process = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"{argv[:4]} failed: {process.stderr[-2000:]}")
    return seconds, process.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output_dir", default="benchmarks/results/client_start")
    args = parser.parse_args()

    from ifa_tf.benchmark.runner import git_commit, script_command

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    work = tempfile.mkdtemp(prefix="client_start-")
    export = ("import ifa_tf, keras; keras.utils.set_random_seed(0); "
              "from ifa_tf import export; "
              f"export.export_saved_model(ifa_tf.zoo.build('ifa'), {work!r} + '/ifa')")
    timed_process([sys.executable, "-c", export], env)
    grpc_port, rest_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "ifa_tf_console", "ifa-serve",
                               "--model_name=ifa", f"--model_base_path={work}/ifa",
                               f"--port={grpc_port}", f"--rest_api_port={rest_port}"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    query = [sys.executable, "-m", "ifa_tf_console", "ifa-query", "--model_name=ifa",
             "--candidates=50", "--sequence_length=500"]
    cases = {
        "ifa-query --protocol=rest": query + [f"--target=127.0.0.1:{rest_port}",
                                              "--protocol=rest"],
        "ifa-query --protocol=grpc": query + [f"--target=127.0.0.1:{grpc_port}"],
        "Python RestClient, one rank": [sys.executable, "-c", _CLIENT.format(
            client="RestClient", target=f"127.0.0.1:{rest_port}")],
        "Python GrpcClient, one rank": [sys.executable, "-c", _CLIENT.format(
            client="GrpcClient", target=f"127.0.0.1:{grpc_port}")],
        "import tensorflow (reference)": [sys.executable, "-c", "import tensorflow"],
    }
    try:
        timed_process(query + [f"--target=127.0.0.1:{grpc_port}", "--wait_s=300"], env)
        results = {}
        for name, argv in cases.items():
            seconds, out = zip(*(timed_process(argv, env) for _ in range(args.repeats)))
            results[name] = {"median_s": round(statistics.median(seconds), 3),
                             "max_s": round(max(seconds), 3), "runs": len(seconds)}
            if name.startswith("Python"):
                results[name]["tensorflow_loaded"] = out[-1].split()[-1] == "True"
    finally:
        server.terminate()
        server.wait(timeout=60)
    os.makedirs(args.output_dir, exist_ok=True)
    record = {"command": script_command(__file__), "commit": git_commit(REPO),
              "cpu_count": os.cpu_count(), "results": results}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = ["| cold process | median s | max s |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['median_s']:.2f} | {r['max_s']:.2f} |"
              for name, r in results.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
