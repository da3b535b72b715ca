"""What raw ids cost `serving_raw` (the SavedModel's raw id mapping, as TF Serving runs it):
peak memory and time per request, for this checkout and, with `--before_commit`, for an
earlier commit's code in the same run (issue 34: ids padded to the longest one, no limit).

For each commit (HEAD, and the earlier one; each extracted with `git archive` into a
temporary directory, so uncommitted edits are not measured) it exports a freshly built `ifa` (default schema, no vocabularies: every id a
string the graph hashes, the costly path), then runs each case in a fresh process: it loads
the SavedModel, warms `serving_raw` up with a small request, builds the case's request,
resets its peak RSS (VmHWM, through /proc/self/clear_refs) and calls `serving_raw` once;
the case's cell is how far the peak rose and how long the call took. Linux only.

    python benchmarks/raw_id_cost.py --before_commit=a7f0cc7 \\
        --output_dir=benchmarks/results/raw_id_cost

Cases (one user, n = 100 sequence events of short ids; `--cases` picks some): m
candidates of short ids ("item-<i>", 10 bytes), one of them replaced by a longer id, and
the largest body of ids at the limit that ifa-serve's --max_request_bytes (64 MiB) lets
through.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 100
# name: (m, length of the one long id or None, every id this long or None)
CASES = {
    "10k_short": (10_000, None, None),
    "10k_one_1KB": (10_000, 1024, None),
    "10k_one_10KB": (10_000, 10 * 1024, None),
    "100k_one_2KB": (100_000, 2 * 1024, None),
    "10k_one_1MB": (10_000, 2**20, None),
    "60k_all_1KB": (60_000, None, 1024),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("before_commit", None, "An earlier commit whose code is measured too, "
                    "as the 'before' column.")
flags.DEFINE_list("cases", list(CASES), f"Cases to run, of {list(CASES)}.")
flags.DEFINE_string("output_dir", None, "Where results.json and results.md go.")
flags.DEFINE_string("note", "", "A line written into the results (e.g. the machine's load).")
flags.DEFINE_integer("timeout_s", 900, "Seconds one case may take.")

EXPORT = """
import sys
import keras
import ifa_tf
from ifa_tf import export
from ifa_tf.schema import default_schema
keras.utils.set_random_seed(0)
schema = default_schema()
print(export.export_saved_model(ifa_tf.zoo.build("ifa", schema=schema), sys.argv[1],
                                schema=schema, warmup_shapes=()))
"""

MEASURE = """
import json, sys, time
import numpy as np
import tensorflow as tf

def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

export_dir, m, one_long, all_long, n = sys.argv[1], *map(json.loads, sys.argv[2:6])
serve = tf.saved_model.load(export_dir).signatures["serving_raw"]

def request(m, n, one_long=None, all_long=None):
    if all_long:
        candidates = [f"{i:09d}".ljust(all_long, "x") for i in range(m)]
    else:
        candidates = [f"item-{i}" for i in range(m)]
    if one_long:
        candidates[m // 2] = "y" * one_long
    return {"user_id": tf.constant(["alice"]),
            "seq_item_id": tf.constant([[f"item-{i}" for i in range(n)]]),
            "seq_category_id": tf.constant([["c1"] * n]),
            "seq_author_id": tf.constant([["a1"] * n]),
            "seq_action": tf.ones([1, n], tf.int64),
            "seq_time_delta": tf.fill([1, n], tf.constant(60, tf.int64)),
            "cand_item_id": tf.constant([candidates]),
            "cand_category_id": tf.constant([["c1"] * m]),
            "cand_author_id": tf.constant([["a1"] * m]),
            "cand_cross_author_count": tf.zeros([1, m], tf.int64),
            "cand_cross_category_count": tf.zeros([1, m], tf.int64)}

serve(**request(8, 8))  # warm-up: the first call's one-time costs are not the case's
features = request(m, n, one_long, all_long)
body = int(sum(tf.size(v).numpy() * 8 if v.dtype != tf.string
               else tf.reduce_sum(tf.strings.length(v)).numpy() for v in features.values()))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = peak_kb()
started = time.perf_counter()
try:
    serve(**features)["score"].numpy()
    answer = "answered"
except tf.errors.OpError as error:  # a refusal, or the mapping running out of memory
    message = error.message[max(error.message.find("assertion failed:"), 0):]
    answer = type(error).__name__ + ": " + message.strip().split("\\n")[0][:300]
seconds = time.perf_counter() - started
print(json.dumps({"answer": answer, "seconds": round(seconds, 3), "body_bytes": body,
                  "peak_growth_mb": round((peak_kb() - before) / 1024, 1)}))
"""


def run_python(source_dir, code, args, timeout):
    env = {**os.environ, "PYTHONPATH": source_dir, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env,
                             cwd=source_dir, capture_output=True, text=True, timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"exit {process.returncode}" + (" (killed: out of memory?)" if
                                                           process.returncode == -9 else "")
                           + f": {process.stderr[-2000:]}")
    return process.stdout.strip().splitlines()[-1]


def measure(source_dir, workdir):
    """`{case: row}` of the code at `source_dir`."""
    export_dir = run_python(source_dir, EXPORT, [os.path.join(workdir, "ifa")],
                            FLAGS.timeout_s)
    results = {}
    for name in FLAGS.cases:
        m, one_long, all_long = CASES[name]
        try:
            results[name] = json.loads(run_python(
                source_dir, MEASURE,
                [export_dir, m, json.dumps(one_long), json.dumps(all_long), N],
                FLAGS.timeout_s))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            results[name] = {"error": str(error).splitlines()[0][:200]}
        print(source_dir, name, results[name], flush=True)
    return results


def cell(row):
    if "error" in row:
        return f"failed: {row['error']} | | "
    answer = row["answer"].split(":")[0].replace("InvalidArgumentError", "INVALID_ARGUMENT")
    return f"{answer} | {row['peak_growth_mb']:,.0f} MB | {row['seconds']:.2f} s"


def markdown(results):
    codes = list(results)
    head = "| case | m | long id | request |" + "".join(
        f" {code}: answer | {code}: peak RSS growth | {code}: time |" for code in codes)
    lines = [head, "|---|---:|---|---:|" + "---|---:|---:|" * len(codes)]
    for name in FLAGS.cases:
        m, one_long, all_long = CASES[name]
        long_id = (f"one of {one_long:,} B" if one_long else
                   f"all {all_long:,} B" if all_long else "none")
        body = next((r[name]["body_bytes"] for r in results.values()
                     if "body_bytes" in r[name]), 0)
        lines.append(f"| {name} | {m:,} | {long_id} | {body / 1e6:.2f} MB | "
                     + " | ".join(cell(results[code][name]) for code in codes) + " |")
    failures = sorted({row["answer"] for r in results.values() for row in r.values()
                       if row.get("answer", "answered") != "answered"})
    return "\n".join(lines) + "\n" + "".join(f"\n- `{answer}`" for answer in failures)


def main(argv):
    del argv
    sys.path.insert(0, REPO)
    from ifa_tf.benchmark.runner import git_commit, script_command

    unknown = sorted(set(FLAGS.cases) - set(CASES))
    if unknown:
        raise app.UsageError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    load_before = os.getloadavg()[0]
    commit = git_commit(REPO)  # measured as extracted now: later commits do not change it
    results = {}
    with tempfile.TemporaryDirectory(prefix="raw_id_cost_") as workdir:
        # Each commit's code, extracted: what is measured is what the commit holds.
        for label, revision in ((f"before ({FLAGS.before_commit})", FLAGS.before_commit),
                                (f"after ({commit})", commit)):
            if revision is None:
                continue
            source_dir = os.path.join(workdir, revision)
            os.makedirs(os.path.join(source_dir, "export"))
            subprocess.run(f"git archive {revision} | tar -x -C {source_dir}", shell=True,
                           cwd=REPO, check=True)
            results[label] = measure(source_dir, os.path.join(source_dir, "export"))
    header = (f"`serving_raw` of `ifa` (default schema, no vocabularies: every id hashed in "
              f"the graph), each code exporting and running its own SavedModel; one user, "
              f"n = {N} sequence events of short ids, m candidates of 10-byte ids (\"item-<i>\") "
              f"but the long one(s); {platform.machine()}, {os.cpu_count()} CPU cores, 1-min "
              f"load average {load_before:.1f} before the run. Peak RSS growth: how far the "
              "call raised its process's peak resident set (VmHWM), the request already "
              "built. Request: the bytes of its tensors.")
    text = header + "\n\n" + markdown(results)
    print(text)
    if FLAGS.output_dir:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        command = script_command(__file__)
        with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
            json.dump({"command": command, "git_commit": commit,
                       "load_average_1min": load_before, "note": FLAGS.note,
                       "results": results}, f, indent=2)
            f.write("\n")
        with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
            f.write(f"# What raw ids cost `serving_raw`\n\nCommand: `{command}`, at commit "
                    f"{commit}.\n\n" + (f"{FLAGS.note}\n\n" if FLAGS.note else "")
                    + text + "\n")


if __name__ == "__main__":
    app.run(main)
