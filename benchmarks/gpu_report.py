"""Writes `results.md` for a folder of `benchmarks/gpu_run.sh` output (JSON), tables only.

    python benchmarks/gpu_report.py benchmarks/results/gpu --commit=0ecea72 \\
        --command='bash benchmarks/gpu_run.sh "$OUT"'

Every figure comes from the JSON files the run wrote; nothing is typed in by hand.
"""

import argparse
import collections
import json
import os


def load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def shape(record):
    return f"{record['m']:,} x {record['n']:,}"


def forward_table(records, reference="ifa"):
    """Median ms (p10-p90) per model and shape, and each model's time over `reference`'s."""
    shapes = list(dict.fromkeys(shape(r) for r in records))
    models = list(dict.fromkeys(r["model"] for r in records))
    cell = {(r["model"], shape(r)): r for r in records}
    lines = ["| model | " + " | ".join(f"m x n = {s}" for s in shapes)
             + f" | vs {reference} at {shapes[-1]} |",
             "|---" * (len(shapes) + 2) + "|"]
    base = cell.get((reference, shapes[-1]))
    for model in models:
        row = []
        for s in shapes:
            r = cell.get((model, s))
            row.append(f"{r['median_ms']:.3f} ({r['p10_ms']:.3f}-{r['p90_ms']:.3f})" if r else "")
        last = cell.get((model, shapes[-1]))
        ratio = f"{last['median_ms'] / base['median_ms']:.1f}x" if last and base else ""
        lines.append(f"| `{model}` | " + " | ".join(row) + f" | {ratio} |")
    return lines


def train_table(records):
    lines = ["| model | step median ms (p90) | requests/s | first step (compile) s |",
             "|---|---|---|---|"]
    for r in records:
        lines.append(f"| `{r['model']}` | {r['step_median_ms']:.2f} ({r['step_p90_ms']:.2f}) | "
                     f"{r['requests_per_s']:,.0f} | {r['first_step_ms'] / 1e3:.1f} |")
    return lines


def profile_tables(record):
    """IFA's device time by layer (summed over its ops) and its largest ops."""
    profile = record["profile"]
    by_layer = collections.Counter()
    for op in profile["ops"]:
        parts = op["op_name"].split("/")
        by_layer[parts[1] if len(parts) > 1 else "(unnamed: copies, pads)"] += op["ms_per_call"]
    lines = [f"Device time {profile['device_ms_per_call'] * 1e3:.0f} us per call "
             f"(wall {record['median_ms'] * 1e3:.0f} us); the {len(profile['ops'])} largest "
             "ops, summed by the layer that emitted them:", "",
             "| layer | us per call | share of device time |", "|---|---|---|"]
    total = profile["device_ms_per_call"]
    for layer, ms in by_layer.most_common():
        lines.append(f"| `{layer}` | {ms * 1e3:.1f} | {ms / total:.0%} |")
    lines += ["", "| XLA op | layer path | us per call | share |", "|---|---|---|---|"]
    for op in profile["ops"]:
        lines.append(f"| `{op['hlo_op']}` | `{op['op_name'] or '-'}` | "
                     f"{op['ms_per_call'] * 1e3:.1f} | {op['share']:.1%} |")
    return lines


def report(folder, commit, command):
    b1, b32 = load(folder, "forward_b1.json"), load(folder, "forward_b32.json")
    train, kernels = load(folder, "train.json"), load(folder, "profile_ifa_kernels.json")
    first = (b1 or b32 or train)[0]
    lines = ["# Zoo on a GPU: Keras 3 on JAX", "",
             f"Device: {first['device_kind']} ({first['device']}); JAX {first['jax']}, "
             f"Keras {first['keras']}; {first['platform']}.", "",
             f"Commit `{commit}`, command `{command}` on the lent GPU machine; "
             f"this file by `python benchmarks/gpu_report.py {folder} --commit={commit}`.", "",
             "Times are wall-clock milliseconds per call of the jitted forward (`score`), "
             "median (p10-p90) of the timed calls, each waited for with `block_until_ready`; "
             "random requests of the benchmarks' generator, inference mode.", ""]
    if b1:
        lines += ["## Forward, one request (B = 1)", ""] + forward_table(b1) + [""]
    if b32:
        lines += ["## Forward, B = 32", ""] + forward_table(b32) + [""]
    if train:
        r = train[0]
        lines += [f"## Training (`model.compile()` defaults, `train_on_batch`), B = {r['batch_size']}, "
                  f"m = {r['m']}, n = {r['n']}", ""] + train_table(train) + [""]
    profiled = [r for r in b1 if "profile" in r]
    if profiled:
        lines += ["## IFA's device time against its wall time (B = 1)", "",
                  "The GPU's busy time per call from a trace, as deployed (XLA runs the forward "
                  "as CUDA graphs); the rest of the wall time is the host: JAX's dispatch of the "
                  "call and the launch.", "", "| m x n | wall us | device us |", "|---|---|---|"]
        lines += [f"| {shape(r)} | {r['median_ms'] * 1e3:.0f} | "
                  f"{r['profile']['device_ms_per_call'] * 1e3:.0f} |" for r in profiled] + [""]
    for r in kernels:
        lines += [f"## IFA's device time kernel by kernel, m x n = {shape(r)}", "",
                  "Traced with XLA's command buffers off, so that each kernel is an event of "
                  "its own.", ""] + profile_tables(r) + [""]
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--command", default='bash benchmarks/gpu_run.sh "$OUT"')
    args = parser.parse_args()
    report(args.folder, args.commit, args.command)


if __name__ == "__main__":
    main()
