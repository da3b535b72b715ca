"""Turns benchmark records into `results.md` and log-log plots."""

import dataclasses
import os

HEADLINE_MODEL = "ifa"


def describe(record):
    kind = record["kind"]
    if kind == "score":
        return (f"{record['model']} {record['path']} m={record['m']} n={record['n']}: "
                f"{record['median_ms']:.1f} ms, peak +{record['peak_memory_mb']:.0f} MB")
    if kind == "train":
        return f"{record['model']} train: {record['requests_per_s']:.1f} requests/s"
    if kind == "attention":
        return (f"attention m={record['m']} n={record['n']}: {record['median_ms']:.2f} ms in a "
                f"graph, {record.get('xla_median_ms', float('nan')):.2f} ms with XLA")
    return f"ERROR {record['job']}: {record['error']}"


def _scores(results, path):
    return {(r["model"], r["m"], r["n"]): r for r in results["records"]
            if r["kind"] == "score" and r["path"] == path}


def headline(results):
    """The issue's goals as measured ratios (None where a figure is missing)."""
    config = results["config"]
    m, n = max(config["m_values"]), max(config["n_values"])
    lines = []
    for path in config["paths"]:
        scores = _scores(results, path)
        ifa = scores.get((HEADLINE_MODEL, m, n))
        if ifa is None:
            continue
        first = (f" (first call of the shape: {ifa['first_call_ms']:.0f} ms)"
                 if "first_call_ms" in ifa else "")
        lines.append(f"- **{path}**, m = {m:,}, n = {n:,}: IFA {ifa['median_ms']:.1f} ms{first}.")
        for other in ("din_full", "twin", "sim_soft", "avg_pooling"):
            record = scores.get((other, m, n))
            if record:
                lines.append(f"  - {other}: {record['median_ms']:.1f} ms, IFA is "
                             f"{record['median_ms'] / ifa['median_ms']:.2f}x faster "
                             f"(IFA / {other} = {ifa['median_ms'] / record['median_ms']:.2f})")
        base = scores.get(("avg_pooling", m, n))
        for field, what, unit in (("peak_tensor_mb", "peak tensor memory", " MB"),
                                  ("peak_memory_mb", "peak RSS growth", " MB")):
            if base and base.get(field, 0) > 0 and field in ifa:
                lines.append(f"  - {what}: IFA {ifa[field]:.1f}{unit}, avg_pooling "
                             f"{base[field]:.1f}{unit}, ratio {ifa[field] / base[field]:.2f}")
        mid_m = sorted(config["m_values"])[len(config["m_values"]) // 2]
        small_n = sorted(config["n_values"])[len(config["n_values"]) // 2]
        low, high = scores.get((HEADLINE_MODEL, mid_m, small_n)), scores.get(
            (HEADLINE_MODEL, mid_m, n))
        if low and high and small_n != n:
            lines.append(f"  - IFA at m = {mid_m:,}: n = {small_n:,} -> {n:,} grows time "
                         f"{high['median_ms'] / low['median_ms']:.2f}x")
    attention = [r for r in results["records"] if r["kind"] == "attention"]
    if attention:
        record, machine = attention[0], results["machine"]
        compute_floor = record["flops"] / (machine["matmul_gflops"] * 1e9) * 1e3
        memory_floor = record["bytes"] / (machine["memory_bandwidth_gbs"] * 1e9) * 1e3
        floor = max(compute_floor, memory_floor)
        lines.append(
            f"- IFA attention module (`NormalizedLinearAttention` as in IFA's FSM, m = "
            f"{record['m']:,}, n = {record['n']:,}, d = {record['depth']}, {record['heads']} "
            f"heads x {record['key_dim']}): {record['flops'] / 1e6:.0f} MFLOP; floor "
            f"{floor:.2f} ms (compute {compute_floor:.2f} ms at {machine['matmul_gflops']:.0f} "
            f"GFLOP/s, memory {memory_floor:.2f} ms at {machine['memory_bandwidth_gbs']:.1f} "
            "GB/s)")
        lines.append(
            f"  - inside a graph: {record['median_ms']:.2f} ms "
            f"({record['p10_ms']:.2f}-{record['p90_ms']:.2f}), {record['median_ms'] / floor:.2f}x"
            " the floor")
        if "xla_median_ms" in record:
            lines.append(
                f"  - inside an XLA-compiled graph: {record['xla_median_ms']:.2f} ms "
                f"({record['xla_p10_ms']:.2f}-{record['xla_p90_ms']:.2f}), "
                f"{record['xla_median_ms'] / floor:.2f}x the floor")
        if "call_median_ms" in record:
            lines.append(f"  - one call from Python (dispatch and output copy included): "
                         f"{record['call_median_ms']:.2f} ms")
    return lines


def write(results, output_dir):
    config = results["config"]
    machine = results["machine"]
    shapes = [(m, n) for m in config["m_values"] for n in config["n_values"]]
    out = [
        "# ifa-bench results",
        "",
        f"Commit `{results['commit']}`, started {results['started']}, wall time "
        f"{results['wall_time_s']:.0f} s. Machine: {machine['platform']}, "
        f"{machine['cpu_count']} CPUs, matmul {machine['matmul_gflops']:.0f} GFLOP/s (float32), "
        f"memory bandwidth {machine['memory_bandwidth_gbs']:.1f} GB/s.",
        "",
        f"Produced by `{command_line(config)}` (see `ifa-bench --help`); "
        f"every model at its zoo defaults{_overridden(config)} (default schema, k = 100), "
        "one request (B = 1), "
        f"{config['warmup']} warm-up and {config['repeats']} timed calls per shape, the timed "
        "calls in rounds over all shapes (a slow spell hits every shape alike); every model "
        f"timed {config.get('rounds', 1)} time(s), in a fresh process each, the order of the "
        "models reversed every other time (a slow spell hits every model alike); median "
        "(p10-p90) milliseconds of all its timed calls. Peak tensor memory: the peak of "
        "TensorFlow's CPU allocator over one shape's warm-up calls, above the bytes held "
        "before them (every tensor counted exactly; left out where the build's CPU "
        "allocator keeps no statistics, as TensorFlow 2.21's does not). Peak RSS growth: the process's peak resident memory once the "
        "shapes up to this one (by m x n) have been warmed up, from after one 8 x 8 request "
        "(TF Serving runs an export's warm-up requests at load); it moves in pages and "
        "allocator caches, so small differences are noise. A fresh process per model and "
        "path.",
        "",
        f"Highest 1-minute load average seen by a measurement: {_max_load(results)} "
        f"(on {machine['cpu_count']} CPUs; above that, other work shared the machine).",
        "",
        "## Headline",
        "",
        *headline(results),
    ]
    for path in config["paths"]:
        scores = _scores(results, path)
        out += ["", f"## Scoring latency through the {path.replace('_', ' ')} (ms)", "",
                "| model | " + " | ".join(f"m={m:,} n={n:,}" for m, n in shapes) + " |",
                "|---" * (len(shapes) + 1) + "|"]
        for model in sorted({k[0] for k in scores}):
            cells = []
            for m, n in shapes:
                r = scores.get((model, m, n))
                cells.append("—" if r is None else
                             f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f})")
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        for field, title, digits in (
                ("peak_tensor_mb", "Peak tensor memory (MB, TensorFlow's allocator)", 1),
                ("peak_memory_mb", "Peak RSS growth (MB, page-level, noisy at this size)", 0)):
            if not any(field in r for r in scores.values()):
                continue
            out += ["", f"{title} through the {path.replace('_', ' ')}:", "",
                    "| model | " + " | ".join(f"m={m:,} n={n:,}" for m, n in shapes) + " |",
                    "|---" * (len(shapes) + 1) + "|"]
            for model in sorted({k[0] for k in scores}):
                cells = [("—" if field not in scores.get((model, m, n), {}) else
                          f"{scores[(model, m, n)][field]:.{digits}f}") for m, n in shapes]
                out.append(f"| {model} | " + " | ".join(cells) + " |")
        _plot(scores, config, path, output_dir)
        out += ["", f"![time vs n](time_vs_n_{path}.png)",
                f"![per-candidate cost vs m](per_candidate_vs_m_{path}.png)"]
    train = [r for r in results["records"] if r["kind"] == "train"]
    if train:
        out += ["", f"## Training throughput (B = {config['train_batch_size']}, "
                f"m = {config['train_m']:,}, n = {config['train_n']:,}, `train_on_batch`)", "",
                "| model | step ms (p10-p90) | requests/s |", "|---|---|---|"]
        for r in sorted(train, key=lambda r: r["model"]):
            out.append(f"| {r['model']} | {r['median_ms']:.1f} ({r['p10_ms']:.1f}-"
                       f"{r['p90_ms']:.1f}) | {r['requests_per_s']:.1f} |")
    errors = [r for r in results["records"] if r["kind"] == "error"]
    if errors:
        out += ["", "## Jobs that failed", ""] + [f"- {r['job']}: {r['error']}" for r in errors]
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(out) + "\n")


def command_line(config):
    """The `ifa-bench` command that reproduces `config`: the flags that differ from the
    defaults, plus --output_dir."""
    from ifa_tf.benchmark.runner import BenchConfig

    defaults = dataclasses.asdict(BenchConfig())
    parts = ["ifa-bench"]
    for name, value in config.items():
        if name != "output_dir" and list(_as_tuple(value)) == list(_as_tuple(defaults[name])):
            continue
        if name == "model_overrides":  # a repeated flag: its values may hold commas
            parts.extend(f"--{name}={v}" for v in value)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts.append(f"--{name}={value}")
    return " ".join(parts)


def _overridden(config):
    overrides = config.get("model_overrides") or ()
    return " but " + ", ".join(f"`{text}`" for text in overrides) if overrides else ""


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _max_load(results):
    loads = [r["load_average_1min"] for r in results["records"] if "load_average_1min" in r]
    return f"{max(loads):.2f}" if loads else "not recorded"


def _plot(scores, config, path, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({k[0] for k in scores})
    for name, outer, inner, per_candidate in (
            (f"time_vs_n_{path}.png", "m_values", "n_values", False),
            (f"per_candidate_vs_m_{path}.png", "n_values", "m_values", True)):
        fixed_values = config[outer]
        fig, axes = plt.subplots(1, len(fixed_values), figsize=(5 * len(fixed_values), 4),
                                 squeeze=False)
        for ax, fixed in zip(axes[0], fixed_values):
            for model in models:
                xs, ys = [], []
                for x in config[inner]:
                    key = (model, fixed, x) if outer == "m_values" else (model, x, fixed)
                    if key in scores:
                        m = key[1]
                        ys.append(scores[key]["median_ms"] * (1e3 / m if per_candidate else 1))
                        xs.append(x)
                if xs:
                    ax.loglog(xs, ys, marker="o", label=model,
                              linewidth=2.5 if model == HEADLINE_MODEL else 1)
            label = "m" if outer == "m_values" else "n"
            ax.set_title(f"{path}: {label} = {fixed:,}")
            ax.set_xlabel("n (sequence length)" if not per_candidate else "m (candidates)")
            ax.set_ylabel("µs per candidate" if per_candidate else "ms per request")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, name), dpi=90)
        plt.close(fig)
