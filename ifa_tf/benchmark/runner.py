"""Runs the benchmark jobs, each in a fresh process, and writes JSON, Markdown and plots."""

import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile

import yaml

from ifa_tf.benchmark import machine, report

PATHS = ("keras", "saved_model")
# Measured on request: the SavedModel exported with jit_compile (XLA, power-of-two buckets).
OPTIONAL_PATHS = ("saved_model_xla",)


@dataclasses.dataclass
class BenchConfig:
    """What `ifa-bench` measures. Every field has a flag of the same name."""

    output_dir: str = "benchmarks/results/ifa_bench"
    models: tuple = ()  # empty: every registered model
    paths: tuple = PATHS
    m_values: tuple = (100, 1_000, 10_000)
    n_values: tuple = (100, 1_000, 10_000)
    repeats: int = 10
    warmup: int = 3
    # Every model is timed in its own process, one after another: a slow spell of a shared
    # machine lands on one model. Each round times every model again, in reverse order on
    # odd rounds, and a cell's figures pool the timed calls of all rounds.
    rounds: int = 2
    train_batch_size: int = 32
    train_m: int = 200
    train_n: int = 1_000
    train_repeats: int = 5
    job_timeout_s: int = 1_800
    # "key=value" (value in YAML): keyword arguments of zoo.build for every model, e.g.
    # "tower_dtype=mixed_bfloat16"; "model:key=value" for that model only, e.g.
    # "ifa:exact_matches=true" (so ifa with an option and avg_pooling share one run).
    model_overrides: tuple = ()

    def __post_init__(self):
        unknown = sorted(set(self.paths) - set(PATHS + OPTIONAL_PATHS))
        if unknown:
            raise ValueError(f"Unknown paths {unknown}. Valid paths: "
                             f"{list(PATHS + OPTIONAL_PATHS)}")
        for field in ("m_values", "n_values"):
            values = getattr(self, field)
            if not values or any(int(v) < 1 for v in values):
                raise ValueError(f"`{field}` must be positive sizes. Received: {values!r}")
        if self.repeats < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError(f"`repeats` and `rounds` must be >= 1 and `warmup` >= 0. "
                             f"Received: repeats={self.repeats}, rounds={self.rounds}, "
                             f"warmup={self.warmup}")
        self.build_overrides()

    def build_overrides(self, model=None):
        """`model_overrides` as keyword arguments of `zoo.build(model, ...)`: the
        `key=value` ones and the `model:key=value` ones of `model`."""
        overrides = {}
        for text in self.model_overrides:
            key, sep, raw = text.partition("=")
            only, colon, key = key.strip().rpartition(":")
            if not sep or not key.strip() or (colon and not only.strip()):
                raise ValueError("A model override must look like key=value or "
                                 f"model:key=value. Received: model_overrides={text!r}")
            if not colon or only.strip() == model:
                overrides[key.strip()] = yaml.safe_load(raw)
        return overrides

    def overridden_models(self):
        """The models named by `model:key=value` overrides."""
        return {text.partition("=")[0].rpartition(":")[0].strip()
                for text in self.model_overrides} - {""}


def jobs(config, models, export_base):
    shapes = [[m, n] for m in config.m_values for n in config.n_values]
    for round_index in range(config.rounds):
        for model in models if round_index % 2 == 0 else reversed(models):
            overrides = config.build_overrides(model)
            for path in config.paths:
                job = {"kind": "score", "model": model, "overrides": overrides, "path": path,
                       "shapes": shapes, "repeats": config.repeats, "warmup": config.warmup,
                       "round": round_index}
                if path.startswith("saved_model"):  # exported by a job of its own: its
                    base = os.path.join(export_base, path, model)  # memory is not counted
                    if round_index == 0:
                        yield {"kind": "export", "model": model, "overrides": overrides,
                               "export_base": base, "jit_compile": path == "saved_model_xla"}
                    job["export_dir"] = os.path.join(base, "1")
                yield job
    for model in models:
        yield {"kind": "train", "model": model, "overrides": config.build_overrides(model),
               "m": config.train_m, "n": config.train_n,
               "batch_size": config.train_batch_size, "repeats": config.train_repeats,
               "warmup": 2}
    largest_m, largest_n = max(config.m_values), max(config.n_values)
    yield {"kind": "attention", "m": largest_m, "n": largest_n, "depth": 48, "heads": 2,
           "key_dim": 16, "repeats": max(config.repeats, 10), "warmup": config.warmup,
           "loop_iterations": 20}


def run_job(job, timeout_s):
    """Runs one job in a subprocess; a crash or timeout becomes an error record."""
    command = [sys.executable, "-m", "ifa_tf.benchmark.worker", json.dumps(job)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired as e:
        lines, error = (e.stdout or b"").decode().splitlines(), f"timed out after {timeout_s} s"
    else:
        lines = done.stdout.splitlines()
        error = None if done.returncode == 0 else (
            f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
    records = [json.loads(line) for line in lines if line.startswith("{")]
    if error:
        records.append({"kind": "error", "job": {k: v for k, v in job.items()
                                                 if k not in ("shapes",)}, "error": error})
    return records


def run_benchmark(config, log=print):
    import ifa_tf

    models = list(config.models) or ifa_tf.zoo.list_models()
    unknown = sorted(set(models) - set(ifa_tf.zoo.list_models()))
    if unknown:
        raise ValueError(f"Unknown models {unknown}. Registered: {ifa_tf.zoo.list_models()}")
    absent = sorted(config.overridden_models() - set(models))
    if absent:
        raise ValueError(f"model_overrides name models that are not benchmarked: {absent}. "
                         f"Benchmarked: {models}")
    for model in models:  # checked before hours of jobs, not in the first one
        overrides = config.build_overrides(model)
        valid = ifa_tf.zoo.valid_overrides(model)
        unknown = sorted(set(overrides) - set(valid or ()))
        if valid is not None and unknown:
            raise ValueError(f"Unknown model_overrides {unknown} for model {model!r}. "
                             f"Valid overrides: {sorted(valid)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    log("measuring this machine's matmul throughput and memory bandwidth")
    results = {
        "config": dataclasses.asdict(config),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "matmul_gflops": machine.matmul_gflops(),
                    "memory_bandwidth_gbs": machine.memory_bandwidth_gbs()},
        "commit": git_commit(),
        "started": started.isoformat(timespec="seconds"),
        "records": [],
    }
    with tempfile.TemporaryDirectory() as export_base:
        for job in jobs(config, models, export_base):
            label = " ".join(str(job.get(k)) for k in ("kind", "model", "path") if job.get(k))
            log(f"running {label}")
            for record in run_job(job, config.job_timeout_s):
                if record["kind"] != "export":
                    results["records"].append(record)
                    log("  " + report.describe(record))
    results["records"] = pool_rounds(results["records"])
    results["wall_time_s"] = round(
        (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report.write(results, config.output_dir)
    return results


def pool_rounds(records):
    """One score record per (model, path, m, n): the timed calls of every round pooled into
    one median and spread; memory and first-call time as the largest a round measured."""
    from ifa_tf.benchmark.worker import summarize

    pooled, order = {}, []
    for record in records:
        if record["kind"] != "score":
            order.append(record)
            continue
        key = (record["model"], record["path"], record["m"], record["n"])
        if key not in pooled:
            pooled[key] = []
            order.append(key)
        pooled[key].append(record)
    out = []
    for item in order:
        if isinstance(item, dict):
            out.append(item)
            continue
        rounds = pooled[item]
        samples = [t for r in rounds for t in r["samples_ms"]]
        merged = {**rounds[0], **summarize(samples), "rounds": len(rounds),
                  "samples_ms": samples}
        for field in ("peak_tensor_mb", "peak_memory_mb", "first_call_ms"):
            if all(field in r for r in rounds):
                merged[field] = max(r[field] for r in rounds)
            else:
                merged.pop(field, None)
        merged["load_average_1min"] = max(r["load_average_1min"] for r in rounds)
        merged.pop("round", None)
        out.append(merged)
    return out


def script_command(script):
    """`python benchmarks/<script's file name> <its arguments, shell-quoted>`: the command
    line a benchmark script's results file records, to be run from the repository root."""
    return f"python benchmarks/{os.path.basename(script)} " + shlex.join(sys.argv[1:])


def git_commit(cwd=None):
    """The short commit of the git checkout at `cwd` (default: the working directory), or
    "unknown" outside one; results files record it beside their figures."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
