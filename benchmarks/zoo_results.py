"""Trains every registered zoo model on the same data with the same budget and writes
`zoo/RESULTS.md` (+ PNG plots): paper-style Table 2 (all models x tasks) and Table 3
(ablations), mean +- std over seeds, the gap to the simulator's ground truth.

    python benchmarks/zoo_results.py --work_dir=/tmp/zoo --movielens_dir=/tmp/ml-100k

Datasets: the simulator (`ifa-data synthetic`, generated into `work_dir/sim`) and, when
`--movielens_dir` is given, MovieLens-100K (`ifa-data from-log --preset=movielens_100k`).
Every run is `ifa_tf.training.train_and_evaluate` with the config `zoo/<model>.yaml` plus the
shared budget overrides below; its `metrics.json` is kept under `work_dir/runs`, so an
interrupted benchmark resumes where it stopped. Whatever ordering comes out is reported.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ABLATIONS = ("ifa", "twin_ram", "ifa_no_ram", "twin")  # paper Table 3, IFA first
ABLATION_NAMES = {"ifa": "IFA", "twin_ram": "IFA - FSM (twin_ram)",
                  "ifa_no_ram": "IFA - RAM (ifa_no_ram)", "twin": "IFA - FSM - RAM (twin)"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/ifa_zoo", "Data and per-run outputs.")
flags.DEFINE_string("movielens_dir", None, "Directory of the MovieLens-100K files "
                    "(fetch_movielens_100k.sh); unset: simulator only.")
flags.DEFINE_string("output_dir", os.path.join(REPO, "zoo"), "Where RESULTS.md and plots go.")
flags.DEFINE_list("models", None, "Models (default: every registered model).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_integer("sim_requests", 12000, "Simulator requests (10% are the test split).")
flags.DEFINE_integer("sim_max_seq_len", 400, "Simulator max n.")
flags.DEFINE_integer("sim_max_candidates", 40, "Simulator max m.")
flags.DEFINE_integer("sim_seed", 0, "Simulator world seed.")
flags.DEFINE_integer("ml_max_seq_len", 400, "MovieLens max n.")
flags.DEFINE_integer("ml_max_candidates", 60, "MovieLens max m.")
flags.DEFINE_integer("epochs", 1, "Simulator training epochs (same for every model).")
flags.DEFINE_integer("ml_epochs", 3, "MovieLens training epochs (same for every model).")
flags.DEFINE_integer("batch_size", 64, "Batch size (same for every model).")
flags.DEFINE_integer("k", 20, "Sub-sequence length k of the sampling baselines.")
flags.DEFINE_multi_string("set", [], "Extra config overrides for every run.")


def budget_overrides(model_name, epochs):
    """The shared budget: same epochs, batch, sizes for all; k for the models that have it."""
    from ifa_tf import zoo

    overrides = [("train.epochs", epochs), ("data.batch_size", FLAGS.batch_size),
                 ("train.verbose", 0), ("train.checkpoint_every_epochs", 0)]
    if "k" in (zoo.valid_overrides(model_name) or ()):
        overrides.append(("model.k", FLAGS.k))
    return overrides + list(FLAGS.set)


def prepare_data():
    """`{dataset: directory}` with the simulator (and MovieLens) TFRecords."""
    from ifa_tf.data import log_converter, simulator

    datasets = {}
    sim_dir = os.path.join(FLAGS.work_dir, "data", "simulator")
    if not os.path.exists(os.path.join(sim_dir, "metadata.json")):
        simulator.write_synthetic(sim_dir, simulator.SimulatorConfig(
            num_requests=FLAGS.sim_requests, seed=FLAGS.sim_seed,
            max_seq_len=FLAGS.sim_max_seq_len, max_candidates=FLAGS.sim_max_candidates),
            num_shards=4)
    datasets["simulator"] = sim_dir
    if FLAGS.movielens_dir:
        ml_dir = os.path.join(FLAGS.work_dir, "data", "movielens_100k")
        if not os.path.exists(os.path.join(ml_dir, "metadata.json")):
            log_converter.convert_movielens_100k(
                FLAGS.movielens_dir, ml_dir, log_converter.LogConfig(
                    max_seq_len=FLAGS.ml_max_seq_len, max_candidates=FLAGS.ml_max_candidates),
                num_shards=4)
        datasets["movielens_100k"] = ml_dir
    return datasets


def run_one(model_name, seed, data_dir, run_dir, epochs):
    """Trains and evaluates one model/seed (or reads the finished run); returns metrics."""
    import keras

    from ifa_tf import training

    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            return json.load(f)
    config = training.load_config(model_name, overrides=[
        ("data.train_data", os.path.join(data_dir, "train-*")),
        ("data.eval_data", os.path.join(data_dir, "test-*")),
        ("train.seed", seed), *budget_overrides(model_name, epochs)])
    keras.backend.clear_session()
    return training.train_and_evaluate(config, run_dir)


def summarise(results, tasks, metric):
    """`{model: {task: (mean, std, n)}}` of one metric over seeds."""
    table = {}
    for model, runs in results.items():
        table[model] = {}
        for task in tasks:
            values = [r["eval"]["tasks"][task][metric] for r in runs]
            table[model][task] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def markdown_table(table, tasks, rows, names=None, truth=None, lower_is_better=False):
    header = "| Model | " + " | ".join(t.replace("_", " ").capitalize() for t in tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 1)]
    pick = min if lower_is_better else max
    best = {t: pick(table[m][t][0] for m in rows) for t in tasks}
    for model in rows:
        cells = []
        for task in tasks:
            mean, std, _ = table[model][task]
            cell = f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{cell}**" if mean == best[task] else cell)
        lines.append(f"| {(names or {}).get(model, model)} | " + " | ".join(cells) + " |")
    if truth:
        lines.append("| *ground truth (best achievable)* | "
                     + " | ".join(f"{truth[t]:.4f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot(all_tables, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_tables), figsize=(7 * len(all_tables), 4.5),
                             squeeze=False)
    for ax, (dataset, (table, truth)) in zip(axes[0], all_tables.items()):
        tasks = list(next(iter(table.values())))
        width = 0.8 / len(tasks)
        x = np.arange(len(models))
        for i, task in enumerate(tasks):
            means = [table[m][task][0] for m in models]
            stds = [table[m][task][1] for m in models]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=task)
            if truth:
                ax.axhline(truth[task], color=f"C{i}", linestyle="--", linewidth=0.8)
        ax.set_xticks(x + width * (len(tasks) - 1) / 2)
        ax.set_xticklabels(models, rotation=30, ha="right")
        values = [table[m][t][0] for m in models for t in tasks]
        ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(dataset + (" (dashed: ground truth)" if truth else ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time(wall, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(models))
    width = 0.8 / len(wall)
    for i, (dataset, times) in enumerate(wall.items()):
        ax.bar(x + i * width, [times[m] for m in models], width, label=dataset)
    ax.set_xticks(x + width * (len(wall) - 1) / 2)
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.set_ylabel("train + eval wall time per run, s (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    started = time.time()
    from ifa_tf import zoo
    from ifa_tf.data import records

    models = FLAGS.models or zoo.list_models()
    seeds = [int(s) for s in FLAGS.seeds]
    datasets = prepare_data()
    results, metadata = {}, {}
    for dataset, data_dir in datasets.items():
        metadata[dataset] = records.read_metadata(data_dir)
        results[dataset] = {}
        for model in models:
            results[dataset][model] = []
            for seed in seeds:
                run_dir = os.path.join(FLAGS.work_dir, "runs", dataset, model, f"seed{seed}")
                epochs = FLAGS.ml_epochs if dataset == "movielens_100k" else FLAGS.epochs
                metrics = run_one(model, seed, data_dir, run_dir, epochs)
                results[dataset][model].append(metrics)
                print(f"{dataset} {model} seed={seed}: "
                      + " ".join(f"{t}={v['auc']:.4f}"
                                 for t, v in metrics["eval"]["tasks"].items())
                      + f" ({metrics['wall_time_s']:.0f}s)", flush=True)
    write_report(results, metadata, models, seeds, time.time() - started)


def write_report(results, metadata, models, seeds, wall_time):
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    run_time = sum(r["wall_time_s"] for by_model in results.values()
                   for runs in by_model.values() for r in runs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    command = "python benchmarks/zoo_results.py " + " ".join(sys.argv[1:])
    lines = [
        "# Zoo results",
        "",
        "Produced by `benchmarks/zoo_results.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Commit: `{commit}`",
        f"- Wall time: {wall_time / 60:.1f} min for this invocation (runs finished earlier "
        f"are read back from `work_dir`); the runs themselves took {run_time / 60:.1f} min "
        f"(CPU, {os.cpu_count()} cores)",
        f"- Seeds: {seeds}; every model: {FLAGS.epochs} epoch(s) on the simulator, "
        f"{FLAGS.ml_epochs} on MovieLens-100K, batch {FLAGS.batch_size}, "
        f"k = {FLAGS.k} for the sampling baselines, other settings from `zoo/<model>.yaml`"
        + (f", overrides {list(FLAGS.set)}" if FLAGS.set else "") + ".",
        "- Protocol `split`: train on the earlier requests (`train`), evaluate on the later "
        "ones (`test`). AUC over all valid candidates of the test requests (paper 5.1), "
        "mean ± std over seeds; bold = best mean per column.",
        "",
    ]
    plots, wall = {}, {}
    for dataset, by_model in results.items():
        meta = metadata[dataset]
        tasks = list(meta["schema"]["tasks"])
        table = summarise(by_model, tasks, "auc")
        first = by_model[models[0]][0]["eval"]["tasks"]
        truth = ({t: first[t]["truth_auc"] for t in tasks}
                 if "truth_auc" in first[tasks[0]] else None)
        plots[dataset] = (table, truth)
        wall[dataset] = {m: float(np.mean([r["wall_time_s"] for r in by_model[m]]))
                         for m in models}
        split = meta["splits"]
        lines += [f"## {dataset}", "",
                  f"Train {split['train']['num_requests']} requests, test "
                  f"{split['test']['num_requests']} requests; mean n "
                  f"{split['test'].get('mean_seq_len', float('nan')):.0f}, mean m "
                  f"{split['test'].get('mean_candidates', float('nan')):.0f} (test split).", "",
                  "### Table 2: AUC of all models", "",
                  markdown_table(table, tasks, models, truth=truth), ""]
        ablations = [m for m in ABLATIONS if m in models]
        if len(ablations) > 1:
            lines += ["### Table 3: ablations", "",
                      markdown_table(table, tasks, ablations, names=ABLATION_NAMES), ""]
        for metric, title in (("gauc", "GAUC (candidate-weighted, one-class requests "
                                       "skipped)"), ("ndcg@10", "NDCG@10"),
                              ("logloss", "Log loss (lower is better)")):
            if metric not in first[tasks[0]]:
                continue
            lines += [f"### {title}", "",
                      markdown_table(summarise(by_model, tasks, metric), tasks, models,
                                     lower_is_better=metric == "logloss"), ""]
        if truth:
            gap = summarise(by_model, tasks, "auc_gap_to_truth")
            lines += ["### Gap to ground truth (truth AUC - model AUC; lower is better)", "",
                      "| Model | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
            lines += [f"| {m} | " + " | ".join(f"{gap[m][t][0]:.4f}" for t in tasks) + " |"
                      for m in models]
            lines.append("")
        leaders = {t: max(models, key=lambda m: table[m][t][0]) for t in tasks}
        lines += ["### Ordering found", "",
                  "Best mean AUC per task: " + ", ".join(f"{t}: `{m}`"
                                                         for t, m in leaders.items()) + ".",
                  "Ranking by mean AUC over tasks: " + " > ".join(
                      f"`{m}`" for m in sorted(models, key=lambda m: -np.mean(
                          [table[m][t][0] for t in tasks]))) + ".", ""]
    plot(plots, models, os.path.join(FLAGS.output_dir, "results_auc.png"))
    plot_time(wall, models, os.path.join(FLAGS.output_dir, "results_wall_time.png"))
    lines += ["## Plots", "", "![AUC per model](results_auc.png)", "",
              "![Wall time per model](results_wall_time.png)", "",
              "| Model | " + " | ".join(f"{d} s/run" for d in wall) + " |",
              "|" + "---|" * (len(wall) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{wall[d][m]:.0f}" for d in wall) + " |"
              for m in models]
    with open(os.path.join(FLAGS.output_dir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
