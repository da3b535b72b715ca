"""What each way of building candidate sets gives away: the leak audit (model-free scores,
pooled AUC and GAUC on the test split; `ifa_tf.data.leak_audit`) of every converter option
on MovieLens-1M (and -100K), and of the simulator with a fixed and a varying set size.

    python benchmarks/leak_audit.py --movielens_1m_dir=ml-1m --movielens_100k_dir=ml-100k \\
        --work_dir=/tmp/leak_audit --output_dir=benchmarks/results/leak_audit

Each row is one conversion with `ifa_tf.data.log_converter.convert_preset` (the preset with
the row's overrides) or one `write_synthetic`; the data are kept under `--work_dir` only
while the script runs. Writes `README.md` (tables, command, commit) and `audit.json`.
"""

import json
import os
import shutil
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("movielens_1m_dir", None, "MovieLens-1M files (fetch_movielens_1m.sh).")
flags.DEFINE_string("movielens_100k_dir", None, "MovieLens-100K files (optional).")
flags.DEFINE_string("work_dir", "/tmp/leak_audit", "Scratch space for the conversions.")
flags.DEFINE_string("output_dir", os.path.join(REPO, "benchmarks", "results", "leak_audit"),
                    "Where README.md and audit.json go.")
flags.DEFINE_integer("simulator_requests", 2000, "Requests of the default simulator rows.")
flags.DEFINE_integer("lifelong_requests", 0, "Requests of a lifelong-preset row (0: none; "
                     "the zoo's size, 20,000, takes ~10 min).")

# (label, what it is, overrides of the preset): one change at a time from the earlier
# composition to the preset's.
LOG_ROWS = (
    ("earlier", "window items + 30 popularity negatives (versions before the audit)",
     dict(fixed_set_size=False, negatives="popularity", exclude_history=False)),
    ("fixed", "fixed m = 50, popularity negatives",
     dict(negatives="popularity", exclude_history=False)),
    ("fixed+exclude", "fixed m, popularity negatives, never a past item",
     dict(negatives="popularity", exclude_history=True)),
    ("exposure", "fixed m, exposure negatives",
     dict(negatives="exposure", exclude_history=False)),
    ("exposure+exclude", "fixed m, exposure negatives, never a past item",
     dict(negatives="exposure", exclude_history=True)),
    ("matched", "fixed m, popularity-matched negatives",
     dict(negatives="popularity_matched", exclude_history=False)),
    ("matched+exclude (preset)", "fixed m, popularity-matched negatives, never a past item",
     dict(negatives="popularity_matched", exclude_history=True)),
)


def log_rows(preset, data_dir, rows):
    from ifa_tf.data import log_converter

    for label, description, overrides in rows:
        output = os.path.join(FLAGS.work_dir, preset, label.split(" ")[0])
        started = time.time()
        metadata = log_converter.convert_preset(preset, data_dir, output, num_shards=1,
                                                **overrides)
        shutil.rmtree(output)
        yield label, description, overrides, metadata, time.time() - started


def simulator_rows():
    from ifa_tf.data import simulator

    configs = [("default, fixed m = 40", simulator.SimulatorConfig(
                    num_requests=FLAGS.simulator_requests, max_candidates=40)),
               ("default, m from 20 to 40 (versions before the audit)",
                simulator.SimulatorConfig(num_requests=FLAGS.simulator_requests,
                                          max_candidates=40, min_candidates=20))]
    if FLAGS.lifelong_requests:
        configs.append(("lifelong preset, fixed m = 40", simulator.lifelong_config(
            num_requests=FLAGS.lifelong_requests)))
    for label, config in configs:
        output = os.path.join(FLAGS.work_dir, "simulator", str(len(label)))
        started = time.time()
        metadata = simulator.write_synthetic(output, config, num_shards=1)
        shutil.rmtree(output)
        overrides = {k: v for k, v in config.to_dict().items()
                     if k in ("num_requests", "max_candidates", "min_candidates")}
        yield label, "", overrides, metadata, time.time() - started


def section(title, rows):
    from ifa_tf.data import leak_audit

    lines = [f"## {title}", ""]
    for label, description, overrides, metadata, seconds in rows:
        test = metadata["splits"]["test"]
        lines += [f"### {label}", "",
                  (f"{description}. " if description else "")
                  + f"Overrides: `{overrides}`. Test split: {test['num_requests']} requests, "
                  f"m {test.get('min_candidates', '?')}-{test.get('max_candidates', '?')} "
                  f"(mean {test['mean_candidates']:.1f}), "
                  + (f"{test['mean_positives']:.1f} positives a request, "
                     if "mean_positives" in test else "")
                  + f"negative fallbacks {metadata.get('negative_fallbacks', 0)}; "
                  f"{seconds:.0f} s to write.", "",
                  leak_audit.format_leak_audit(metadata["leak_audit"],
                                               metadata["schema"]["tasks"]), ""]
    return lines


def main(argv):
    del argv
    from ifa_tf.benchmark import runner

    commit = runner.git_commit(REPO)
    command = runner.script_command(__file__)
    sections, record = [], {}
    datasets = [("MovieLens-1M (`--preset=movielens_1m`)", "movielens_1m",
                 FLAGS.movielens_1m_dir, LOG_ROWS),
                ("MovieLens-100K (`--preset=movielens_100k`, m = 200)", "movielens_100k",
                 FLAGS.movielens_100k_dir, (LOG_ROWS[0], LOG_ROWS[-1]))]
    for title, preset, data_dir, rows in datasets:
        if not data_dir:
            continue
        done = list(log_rows(preset, data_dir, rows))
        sections += section(title, done)
        record[preset] = {label: {"overrides": overrides, "leak_audit": m["leak_audit"],
                                  "test": m["splits"]["test"]}
                          for label, _, overrides, m, _ in done}
        print("\n".join(section(title, done)), flush=True)
    done = list(simulator_rows())
    sections += section("Simulator (`ifa-data synthetic`)", done)
    record["simulator"] = {label: {"overrides": overrides, "leak_audit": m["leak_audit"]}
                           for label, _, overrides, m, _ in done}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    header = [
        "# Leak audit of candidate-set construction",
        "",
        "Written by `benchmarks/leak_audit.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Commit: `{commit}`",
        "- Each table: the scores of `ifa_tf.data.leak_audit` on the test split and the "
        "pooled AUC / GAUC they reach per task: the model-free ones (`set_size`, "
        "`popularity`, `set_popularity`, `in_history`, `cooccurrence`) and the "
        "`base_rate_oracle` ceiling; that module's docstring defines each. 0.5 = the score "
        "tells nothing; under 0.5 tells as much, inverted. GAUC is per request: no "
        "request-level signal (set size, a user's activity) moves it.",
        "",
    ]
    with open(os.path.join(FLAGS.output_dir, "README.md"), "w") as f:
        f.write("\n".join(header + sections) + "\n")
    with open(os.path.join(FLAGS.output_dir, "audit.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "audits": record}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
