"""`ifa-data from-log` and `ifa-state build` in-process against Apache Beam (`--runner`):
events (or users) per second and the peak resident memory of every process of a run.

    python benchmarks/beam_convert.py generate --events=20000000 --files=8 \\
        --output=/tmp/beam_bench/log_20m
    python benchmarks/beam_convert.py convert --name=gen_20m_beam2 \\
        --input='/tmp/beam_bench/log_20m/*.csv' --workers=2 -- --columns=... (from-log flags)
    python benchmarks/beam_convert.py convert --name=ml1m_inprocess --workers=0 \\
        --input=/tmp/ml-1m -- --preset=movielens_1m
    python benchmarks/beam_convert.py states --name=ml1m_states_beam2 --workers=2 \\
        --model=... --log=... --dataset=...
    python benchmarks/beam_convert.py report --write   # the table of results/beam/README.md

`convert` and `states` run the command as a child process (stopped if its processes hold
more than 12 GB together, so as not to starve the other jobs of the shared machine) (`--workers=0`: in-process; N: the
DirectRunner in multi-process mode with N workers) and sample every process of its tree
four times a second: each one's peak resident set (`VmHWM` of /proc/<pid>/status, the
kernel's own high-water mark) is kept. A Beam run has the driver (which, with the
DirectRunner, also holds the data between stages: its shuffle), and one process per worker.
Each result is one JSON file in `benchmarks/results/beam/`, with the command, the commit and
the machine's load while it ran (the runs were made beside other jobs).

The generated log: `--events` rows of `user,item,category,timestamp,action` in `--files`
CSV files (the log's time split in equal ranges, rows in time order within each file, as a
partitioned log arrives), one user per 1,000 events (so users grow with the log and each
history holds about 1,000 events over the year), 20,000 items with Zipf-like popularity
and string ids (`i<k>`), 100 categories, actions `view` 70 %, `click` 25 %, `like` 5 %.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "beam")
YEAR = 365 * 86_400
START = 1_700_000_000
NUM_ITEMS = 20_000
EVENTS_PER_USER = 1_000
TABLE_MARK = "<!-- table -->"
MEMORY_LIMIT_GB = 12  # of the 23.5 GB this machine shares with other jobs
# The from-log flags of the generated log's runs.
GENERATED_FLAGS = ["--columns=user,item,category,timestamp,action",
                   "--actions=click:click,like:click+like", "--window_seconds=2592000",
                   "--max_seq_len=200", "--max_candidates=50", "--num_negatives=30",
                   "--num_shards=8"]


# ----------------------------------------------------------------------------- generate
def generate(events, files, output, seed=0):
    """Writes the generated log (see the module docstring) into `output`."""
    os.makedirs(output, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_users = max(1, events // EVENTS_PER_USER)
    ranks = np.arange(1, NUM_ITEMS + 1)
    popularity = 1.0 / (ranks + 10.0) ** 0.9
    popularity /= popularity.sum()
    item_of_rank = rng.permutation(NUM_ITEMS)
    actions = np.array(["view", "click", "like"])
    per_file = np.full(files, events // files)
    per_file[: events % files] += 1
    bounds = np.linspace(0, YEAR, files + 1).astype(np.int64)
    written = 0
    for index, count in enumerate(per_file):
        times = np.sort(rng.integers(bounds[index], bounds[index + 1], count)) + START
        users = rng.integers(1, num_users + 1, count)
        items = item_of_rank[rng.choice(NUM_ITEMS, count, p=popularity)]
        kinds = actions[rng.choice(3, count, p=[0.70, 0.25, 0.05])]
        path = os.path.join(output, f"log-{index:05d}-of-{files:05d}.csv")
        with open(path + ".tmp", "w") as f:
            f.write("user,item,category,timestamp,action\n")
            f.writelines(f"{u},i{i},c{i % 100},{t},{a}\n" for u, i, t, a in zip(
                users.tolist(), items.tolist(), times.tolist(), kinds.tolist()))
        os.replace(path + ".tmp", path)
        written += count
        print(f"{path}: {count} events ({written}/{events})", flush=True)
    return output


# -------------------------------------------------------------------------------- runs
def _status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def measure(command, env=None, memory_limit_gb=MEMORY_LIMIT_GB):
    """Runs `command`; returns its wall seconds, exit status, output tail and the peak RSS
    of each process of its tree (`{pid: {"peak_rss_bytes", "role", "command"}}`). The
    machine is shared: when the tree's resident memory passes `memory_limit_gb`, the run is
    stopped (`stopped_for_memory`) rather than let it starve the other jobs."""
    import psutil

    started = time.perf_counter()
    load_before = os.getloadavg()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env)
    peaks, loads = {}, []
    output = []
    stopped = None

    import threading

    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        resident = 0
        for member in tree:
            peak = _status(member.pid, "VmHWM")
            if peak is None:
                continue
            entry = peaks.setdefault(member.pid, {"command": _command_line(member.pid)})
            entry["peak_rss_bytes"] = max(entry.get("peak_rss_bytes", 0), peak)
            resident += _status(member.pid, "VmRSS") or 0
        if resident > memory_limit_gb * 2**30 and stopped is None:
            stopped = {"resident_gb": round(resident / 2**30, 2),
                       "after_seconds": round(time.perf_counter() - started, 1)}
            for member in reversed(tree):
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
        loads.append(os.getloadavg()[0])
        time.sleep(0.25)
    process.wait()
    reader.join(5)
    seconds = time.perf_counter() - started
    for pid, entry in peaks.items():
        command_text = entry["command"]
        entry["role"] = ("driver" if pid == process.pid else
                         "shell" if command_text.startswith("/bin/sh") else
                         "worker" if "sdk_worker_main" in command_text else "other")
    return {"seconds": round(seconds, 1), "returncode": process.returncode,
            "stopped_for_memory": stopped,
            "output_tail": b"".join(output).decode(errors="replace")[-3000:],
            "processes": {str(pid): entry for pid, entry in peaks.items()
                          if entry.get("peak_rss_bytes")},
            "load_average_1m": {"before": load_before[0],
                                "mean_during": round(float(np.mean(loads)), 2) if loads
                                else None}}


def _summary(result):
    processes = result["processes"].values()  # the `sh -c` that starts a worker is not one
    workers = [p["peak_rss_bytes"] for p in processes if p["role"] == "worker"]
    drivers = [p["peak_rss_bytes"] for p in processes if p["role"] == "driver"]
    return {"driver_peak_rss_mb": round(max(drivers) / 2**20) if drivers else None,
            "worker_peak_rss_mb": [round(w / 2**20) for w in sorted(workers)],
            "max_worker_peak_rss_mb": round(max(workers) / 2**20) if workers else None}


def _commit():
    """The commit of the code measured: `IFA_TF_COMMIT` when the code runs from an export of
    it (`git archive`), else the checkout's HEAD."""
    return os.environ.get("IFA_TF_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _runner_flags(workers):
    if not workers:
        return []
    return ["--runner=DirectRunner",
            f"--pipeline_options=--direct_num_workers={workers}"]


def _write(name, record):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: v for k, v in record.items() if k != "run"}, indent=1))
    return path


def convert(name, input_path, workers, output_dir, extra):
    """One `ifa-data from-log` run, measured; the events it read come from its metadata."""
    from ifa_tf.data import records

    command = [os.path.join(os.path.dirname(sys.executable), "ifa-data"), "from-log",
               f"--input={input_path}", f"--output_dir={output_dir}",
               *_runner_flags(workers), *extra]
    subprocess.run(["rm", "-rf", output_dir], check=True)
    result = measure(command)
    record = {"name": name, "command": " ".join(command), "commit": _commit(),
              "workers": workers, "machine": _machine(), "run": result,
              **_summary(result)}
    if result["returncode"] == 0:
        metadata = records.read_metadata(output_dir)
        rows = metadata["num_events"] + metadata["bad_rows"]
        requests = sum(s["num_requests"] for s in metadata["splits"].values())
        record.update({"log_rows": rows, "events_after_merging": metadata["num_events"],
                       "requests": requests,
                       "events_per_second": round(rows / result["seconds"]),
                       "requests_per_second": round(requests / result["seconds"], 1)})
    return _write(name, record)


def states(name, workers, extra):
    """One `ifa-state build` run, measured; users per second from its printed result."""
    command = [os.path.join(os.path.dirname(sys.executable), "ifa-state"), "build",
               *_runner_flags(workers), *extra]
    result = measure(command)
    record = {"name": name, "command": " ".join(command), "commit": _commit(),
              "workers": workers, "machine": _machine(), "run": result, **_summary(result)}
    lines = [line for line in result["output_tail"].splitlines() if line.startswith("{")]
    if result["returncode"] == 0 and lines:
        printed = json.loads(lines[-1])
        record.update({"users": printed["users"],
                       "users_per_second": round(printed["users"] / result["seconds"], 1)})
    return _write(name, record)


def _machine():
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                               / 2**30, 1)}


# ------------------------------------------------------------------------------ report
def report():
    """The table of every run's figures (`results/beam/README.md` quotes it), and the
    per-worker peak of the largest generated log against the smallest."""
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    lines = ["| run | mode | log rows / users | seconds | per second | driver peak RSS MB | "
             "each worker's peak RSS MB | load (1 min avg) | commit |", "|---" * 9 + "|"]
    for run in runs:
        mode = "in-process" if not run["workers"] else (
            f"Beam, {run['workers']} worker{'s' if run['workers'] > 1 else ''}")
        stopped = run["run"].get("stopped_for_memory")
        amount = run.get("log_rows", run.get("users", "stopped" if stopped else "failed"))
        rate = run.get("events_per_second", run.get("users_per_second", "-"))
        lines.append(f"| {run['name']} | {mode} | {amount} | {run['run']['seconds']} | "
                     f"{rate} | {run['driver_peak_rss_mb']} | "
                     f"{', '.join(map(str, run['worker_peak_rss_mb'])) or '-'} | "
                     f"{run['run']['load_average_1m']['mean_during']} | "
                     f"{run['commit'][:7]} |")
    by_name = {run["name"]: run for run in runs}
    for workers in (2, 1):
        small = by_name.get(f"generated_1m_beam_{workers}_worker{'s' if workers > 1 else ''}")
        large = by_name.get(f"generated_20m_beam_{workers}_worker{'s' if workers > 1 else ''}")
        if small and large and large.get("max_worker_peak_rss_mb") and "log_rows" in large:
            ratio = large["max_worker_peak_rss_mb"] / small["max_worker_peak_rss_mb"]
            lines.append(f"\nBeam, {workers} worker{'s' if workers > 1 else ''}: the largest "
                         f"worker peak on the 20M-event "
                         f"log is {ratio:.2f}x the one on the 1M-event log "
                         f"({large['max_worker_peak_rss_mb']} MB against "
                         f"{small['max_worker_peak_rss_mb']} MB).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--events", type=int, required=True)
    gen.add_argument("--files", type=int, default=8)
    gen.add_argument("--output", required=True)
    gen.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("convert")
    run.add_argument("--name", required=True)
    run.add_argument("--input", required=True)
    run.add_argument("--workers", type=int, default=2)
    run.add_argument("--output_dir", default="/tmp/beam_bench/out")
    run.add_argument("--generated", action="store_true",
                     help="add the generated log's from-log flags")
    build = sub.add_parser("states")
    build.add_argument("--name", required=True)
    build.add_argument("--workers", type=int, default=2)
    written = sub.add_parser("report")
    written.add_argument("--write", action="store_true",
                         help="put the table into results/beam/README.md, between its "
                              "<!-- table --> markers")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.what == "generate":
        generate(args.events, args.files, args.output, args.seed)
    elif args.what == "convert":
        convert(args.name, args.input, args.workers, args.output_dir,
                (GENERATED_FLAGS if args.generated else []) + extra)
    elif args.what == "states":
        states(args.name, args.workers, extra)
    elif args.write:
        path = os.path.join(RESULTS, "README.md")
        with open(path) as f:
            text = f.read()
        before, _, rest = text.partition(TABLE_MARK)
        _, _, after = rest.partition(TABLE_MARK)
        with open(path, "w") as f:
            f.write(f"{before}{TABLE_MARK}\n{report()}\n{TABLE_MARK}{after}")
    else:
        print(report())


if __name__ == "__main__":
    main()
