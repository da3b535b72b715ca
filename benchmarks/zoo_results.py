"""Trains every registered zoo model on the same data with the same budget and writes
`zoo/RESULTS.md` (+ PNG plots): paper-style Table 2 (all models x tasks) and Table 3
(ablations) with pooled AUC and GAUC side by side, mean +- std over seeds, each dataset's
leak audit (what model-free scores reach on the same test split) and the simulator's
ceiling ladder beside them, and AUC by sequence length (short to long users).

    python benchmarks/zoo_results.py --work_dir=/tmp/zoo --movielens_1m_dir=/tmp/ml-1m

Datasets (`--datasets`): `lifelong` (`ifa-data synthetic --preset=lifelong`: sequences in
the thousands, a truth that rewards reading all of them), `movielens_1m` (`ifa-data from-log
--preset=movielens_1m`, the real log with the longest users), and the older `simulator`
(the default simulator world) and `movielens_100k`. Every run is
`ifa_tf.training.train_and_evaluate` with the config `zoo/<model>.yaml` plus the shared
budget overrides below; its `metrics.json` is kept under `work_dir/runs`, so an interrupted
benchmark resumes where it stopped. `--extra_run=label=model:key=value` adds a row that
changes settings of a model, e.g. `din_all=din:k=null` (DIN's unit over every event) or
`din_full_k100=din_full:k=100` (exact attention over the last 100): the report's "Range and
mechanism" table separates the range a model reads from how it weighs events.
`--row_datasets=din_all=movielens_1m` keeps a row to the datasets where it is affordable.
Whatever ordering comes out is reported.
"""

import json
import os
import time

import numpy as np
from absl import app, flags

ABLATIONS = ("ifa", "twin_ram", "ifa_no_ram", "twin")  # paper Table 3, IFA first
ABLATION_NAMES = {"ifa": "IFA", "twin_ram": "IFA - FSM (twin_ram)",
                  "ifa_no_ram": "IFA - RAM (ifa_no_ram)", "twin": "IFA - FSM - RAM (twin)"}
# How each attention model reads the sequence: "Range and mechanism" puts side by side the
# rows that differ in one of the two (`din` vs `din_full` differ in both by default).
MECHANISMS = {"din": "DIN MLP unit", "din_full": "softmax dot-product attention",
              "ifa_no_ram": "linear attention, {fsm}",
              "ifa": "linear attention, {fsm}, + RAM ({ram})"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMULATED = ("lifelong", "short", "simulator")
# The models whose search or attention costs O(mn) (README's model table); `--mn_seeds`.
MN_MODELS = ("din_full", "sim_hard", "sim_soft", "twin", "twin_ram", "eta")
DATASETS = (*SIMULATED, "movielens_1m", "movielens_100k")

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/ifa_zoo", "Data and per-run outputs.")
flags.DEFINE_list("datasets", ["lifelong", "movielens_1m"],
                  f"Datasets, from {list(DATASETS)}.")
flags.DEFINE_string("movielens_1m_dir", None, "Directory of the MovieLens-1M files "
                    "(fetch_movielens_1m.sh); needed for movielens_1m.")
flags.DEFINE_string("movielens_dir", None, "Directory of the MovieLens-100K files "
                    "(fetch_movielens_100k.sh); needed for movielens_100k.")
flags.DEFINE_string("output_dir", os.path.join(REPO, "zoo"), "Where RESULTS.md and plots go.")
flags.DEFINE_list("models", None, "Models (default: every registered model).")
flags.DEFINE_multi_string("extra_run", [], "An extra row label=model[:key=value[,key=value]] "
                          "of model overrides, e.g. din_all=din:k=null (YAML values).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_list("mn_seeds", None, "Seeds of the O(mn) models "
                  f"({', '.join(MN_MODELS)}, and extra rows built on them), when time "
                  "allows fewer runs of them than of the others (default: --seeds). The "
                  "report marks their cells.")
flags.DEFINE_list("mn_rows", None, "The rows (model names or --extra_run labels) that run "
                  "--mn_seeds only (default: the O(mn) models and extra rows built on them).")
flags.DEFINE_list("mn_datasets", None, "The datasets on which --mn_rows run --mn_seeds "
                  "only (default: every dataset); on the others they run --seeds, e.g. "
                  "when one dataset's runs of every seed exist already.")
flags.DEFINE_multi_string("row_datasets", [], "label=dataset[+dataset]: the only datasets "
                          "a row runs on (default: all of --datasets), e.g. "
                          "din_all=movielens_1m for a row too costly on the others; the "
                          "report names the rows a dataset lacks.")
flags.DEFINE_integer("lifelong_requests", None, "Requests of the lifelong and short presets (default: "
                     "the preset's).")
flags.DEFINE_integer("sim_requests", 12000, "Default-simulator requests (10% are the test "
                     "split).")
flags.DEFINE_integer("sim_max_seq_len", 400, "Default-simulator max n.")
flags.DEFINE_integer("sim_max_candidates", 40, "Default-simulator max m.")
flags.DEFINE_integer("sim_seed", 0, "Simulator world seed.")
flags.DEFINE_integer("ml_max_seq_len", 400, "MovieLens-100K max n.")
flags.DEFINE_integer("ml_max_candidates", 60, "MovieLens-100K m (at least half of it "
                     "negatives).")
flags.DEFINE_integer("epochs", 1, "Training epochs on simulated data (same for every model).")
flags.DEFINE_integer("ml_epochs", 3, "Training epochs on MovieLens (same for every model).")
flags.DEFINE_integer("batch_size", 64, "Batch size (same for every model).")
flags.DEFINE_integer("group_by_length", 16, "data.group_by_length of every run: batches of "
                     "like sequence length, sorted this many batches at a time (0: off).")
flags.DEFINE_integer("k", 100, "Sub-sequence length k of the sampling baselines.")
flags.DEFINE_string("length_reference", "twin", "The model whose AUC each model's is "
                    "compared with per sequence-length group.")
flags.DEFINE_multi_string("set", [], "Extra config overrides for every run.")
flags.DEFINE_bool("read_only", False, "Train nothing: report the runs already finished in "
                  "--work_dir (a row, seed or dataset without one is left out and the table "
                  "says how many seeds each cell has).")


def parse_extra_run(spec):
    """`label=model[:key=value,...]` -> (label, model, [(model.key, value)])."""
    import yaml

    label, _, rest = spec.partition("=")
    model, _, settings = rest.partition(":")
    if not label or not model:
        raise app.UsageError(f"--extra_run must be label=model[:key=value,...]. "
                             f"Received: --extra_run={spec!r}")
    overrides = []
    for setting in filter(None, settings.split(",")):
        key, equals, value = setting.partition("=")
        if not equals:
            raise app.UsageError(f"--extra_run settings are key=value. Received: {setting!r} "
                                 f"in --extra_run={spec!r}")
        overrides.append((f"model.{key}", yaml.safe_load(value)))
    return label, model, overrides


def budget_overrides(model_name, epochs):
    """The shared budget: same epochs, batch, sizes for all; `--k` for the sampling
    baselines (the models whose `zoo/<model>.yaml` sets a k: `din_full` and `ifa` take one
    too, but read every event unless a row sets it)."""
    from ifa_tf import training

    overrides = [("train.epochs", epochs), ("data.batch_size", FLAGS.batch_size),
                 ("data.group_by_length", FLAGS.group_by_length),
                 ("train.verbose", 0), ("train.checkpoint_every_epochs", 0)]
    if "k" in training.load_config(model_name).model.overrides:
        overrides.append(("model.k", FLAGS.k))
    return overrides + list(FLAGS.set)


def prepare_data():
    """`{dataset: directory}` of the TFRecords of `--datasets` (written once)."""
    from ifa_tf.data import log_converter, simulator

    unknown = sorted(set(FLAGS.datasets) - set(DATASETS))
    if unknown:
        raise app.UsageError(f"--datasets: unknown {unknown}; known: {list(DATASETS)}.")
    writers = {
        "lifelong": lambda path: simulator.write_synthetic(path, simulator.lifelong_config(
            seed=FLAGS.sim_seed, **({"num_requests": FLAGS.lifelong_requests}
                                    if FLAGS.lifelong_requests else {})), num_shards=4),
        "short": lambda path: simulator.write_synthetic(path, simulator.short_config(
            seed=FLAGS.sim_seed, **({"num_requests": FLAGS.lifelong_requests}
                                    if FLAGS.lifelong_requests else {})), num_shards=4),
        "simulator": lambda path: simulator.write_synthetic(path, simulator.SimulatorConfig(
            num_requests=FLAGS.sim_requests, seed=FLAGS.sim_seed,
            max_seq_len=FLAGS.sim_max_seq_len, max_candidates=FLAGS.sim_max_candidates),
            num_shards=4),
        "movielens_1m": lambda path: log_converter.convert_preset(
            "movielens_1m", _required_dir("movielens_1m_dir"), path, num_shards=4),
        "movielens_100k": lambda path: log_converter.convert_preset(
            "movielens_100k", _required_dir("movielens_dir"), path, num_shards=4,
            max_seq_len=FLAGS.ml_max_seq_len, max_candidates=FLAGS.ml_max_candidates,
            num_negatives=min(50, FLAGS.ml_max_candidates // 2)),
    }
    for dataset, flag in (("movielens_1m", "movielens_1m_dir"),
                          ("movielens_100k", "movielens_dir")):
        if dataset in FLAGS.datasets:
            _required_dir(flag)  # before hours of other work
    datasets = {}
    for dataset in FLAGS.datasets:
        path = os.path.join(FLAGS.work_dir, "data", dataset)
        if not os.path.exists(os.path.join(path, "metadata.json")):
            writers[dataset](path)
        datasets[dataset] = path
    return datasets


def _required_dir(flag):
    if not FLAGS[flag].value:
        raise app.UsageError(f"--{flag} is needed for the datasets {list(FLAGS.datasets)}.")
    return FLAGS[flag].value


def run_one(model_name, seed, data_dir, run_dir, epochs, model_overrides=()):
    """Trains and evaluates one model/seed (or reads the finished run); returns metrics."""
    import keras

    from ifa_tf import training

    config = training.load_config(model_name, overrides=[
        ("data.train_data", os.path.join(data_dir, "train-*")),
        ("data.eval_data", os.path.join(data_dir, "test-*")),
        ("train.seed", seed), *budget_overrides(model_name, epochs), *model_overrides])
    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):
        import yaml

        with open(os.path.join(run_dir, "config.yaml")) as f:
            # By value, the run's file read with today's defaults: a setting added since,
            # at its default, is the same config (the run trained as that default does).
            ran = training.Config.from_dict(yaml.safe_load(f))
            if ran.to_dict() != config.to_dict():
                raise app.UsageError(f"{run_dir} holds a finished run of another config "
                                     "(settings changed since): use a new --work_dir.")
        with open(metrics_path) as f:
            return json.load(f)
    keras.backend.clear_session()
    return training.train_and_evaluate(config, run_dir)


ORDERING_NOTE = (
    "`≈` joins a row to the first of its group when their means differ by no more than the "
    "larger of the two rows' spreads over seeds (max - min): a difference the seeds alone "
    "make is not a finding. A row of one seed has no spread of its own.")


def per_seed(by_model, tasks, metric):
    """`{row: [value per seed]}`, each the mean of `metric` over `tasks`."""
    return {m: [float(np.mean([r["eval"]["tasks"][t][metric] for t in tasks])) for r in runs]
            for m, runs in by_model.items()}


def ordering(values, first_only=False):
    """The rows best first, in groups: a row joins the group of the best row not yet
    placed when the two means differ by no more than the larger spread (max - min over
    seeds) of the two; groups joined by ` > `, rows within one by ` ≈ `. `first_only`:
    the first group alone."""
    mean = {m: float(np.mean(v)) for m, v in values.items()}
    spread = {m: max(v) - min(v) for m, v in values.items()}
    left, groups = sorted(values, key=lambda m: -mean[m]), []
    while left:
        lead = left[0]
        group = [m for m in left
                 if mean[lead] - mean[m] <= max(spread[lead], spread[m])]
        groups.append(group)
        left = [m for m in left if m not in group]
    shown = groups[:1] if first_only else groups
    return " > ".join(" ≈ ".join(f"`{m}`" for m in group) for group in shown)


def summarise(results, tasks, metric):
    """`{model: {task: (mean, std, n)}}` of one metric over seeds."""
    table = {}
    for model, runs in results.items():
        table[model] = {}
        for task in tasks:
            values = [r["eval"]["tasks"][task][metric] for r in runs]
            table[model][task] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def format_mean_std(mean, std, num_seeds):
    """`mean ± std` over seeds; a single run says so instead of showing a zero std, and a
    cell of fewer seeds than `--seeds` says how many it has."""
    if num_seeds == 1:
        return f"{mean:.4f} (1 seed)"
    fewer = f" ({num_seeds} seeds)" if num_seeds < len(FLAGS.seeds) else ""
    return f"{mean:.4f} ± {std:.4f}{fewer}"


def markdown_table(table, tasks, rows, names=None, truth=None, lower_is_better=False,
                   gauc=None):
    """One row per model, one column per task; with `gauc` (a `summarise` table of GAUC),
    each task's pooled AUC and GAUC side by side."""
    columns = [(t, table, "") for t in tasks]
    if gauc is not None:
        columns = [c for t in tasks for c in ((t, table, " AUC"), (t, gauc, " GAUC"))]
    header = "| Model | " + " | ".join(t.replace("_", " ").capitalize() + suffix
                                       for t, _, suffix in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    pick = min if lower_is_better else max
    for model in rows:
        cells = []
        for task, values, _ in columns:
            mean, std, num_seeds = values[model][task]
            cell = format_mean_std(mean, std, num_seeds)
            best = pick(values[m][task][0] for m in rows)
            cells.append(f"**{cell}**" if mean == best else cell)
        lines.append(f"| {(names or {}).get(model, model)} | " + " | ".join(cells) + " |")
    if truth:
        lines.append("| *ground truth (best achievable)* | " + " | ".join(
            f"{truth[t]:.4f}" if suffix != " GAUC" else "–" for t, _, suffix in columns)
            + " |")
    return "\n".join(lines)


def audit_lines(meta):
    """The dataset's leak audit (test split) and what it says of pooled AUC."""
    from ifa_tf.data import leak_audit

    audit = meta.get("leak_audit")
    if not audit:
        return ["No leak audit recorded: the data were written before the audit existed; "
                "read GAUC.", ""]
    warning = leak_audit.set_size_warning(audit)
    verdict = (f"Set size alone scores pooled AUC outside 0.5 ± "
               f"{leak_audit.SET_SIZE_TOLERANCE}: pooled AUC measures the candidate sets' "
               "construction here; read GAUC." if warning else
               "Set size alone scores 0.5: a set's size tells nothing of its labels. Pooled "
               "AUC still moves with what differs between requests (a user's activity, the "
               "set's overall popularity), so read GAUC first: a model whose pooled AUC "
               "gains while its GAUC does not has learned which requests hold more "
               "positives, not how to rank within one. A model should beat every row by "
               "GAUC; where a score beats 0.5 by GAUC, that much is reachable without "
               "knowing the user.")
    return ["### Leak audit (test split)", "",
            "Model-free scores and the AUC / GAUC they reach (`ifa_tf.data.leak_audit`: set "
            "size, the item's train popularity, the set's mean popularity, the candidate is "
            "in the user's sequence, similarity to the other candidates of the set from "
            "train co-occurrence), and the base rate oracle: each request's own positive "
            "rate, read from its labels, which ranks nothing within a request. Its pooled "
            "AUC is what knowing how many positives each request holds is worth: pooled AUC "
            "up to it can be earned without ranking.", "",
            leak_audit.format_leak_audit(audit, meta["schema"]["tasks"]), "", verdict, ""]


def plot(all_tables, models, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_tables), figsize=(7 * len(all_tables), 4.5),
                             squeeze=False)
    for ax, (dataset, (table, truth)) in zip(axes[0], all_tables.items()):
        tasks = list(next(iter(table.values())))
        width = 0.8 / len(tasks)
        rows = [m for m in models if m in table]
        x = np.arange(len(rows))
        for i, task in enumerate(tasks):
            means = [table[m][task][0] for m in rows]
            stds = [table[m][task][1] for m in rows]
            ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=task)
            if truth:
                ax.axhline(truth[task], color=f"C{i}", linestyle="--", linewidth=0.8)
        ax.set_xticks(x + width * (len(tasks) - 1) / 2)
        ax.set_xticklabels(rows, rotation=30, ha="right")
        values = [table[m][t][0] for m in rows for t in tasks]
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
        ax.bar(x + i * width, [times.get(m, 0.0) for m in models], width, label=dataset)
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
    from ifa_tf.benchmark import runner
    from ifa_tf.data import records

    # The code this process runs: taken now, since HEAD may move while the runs take hours.
    commit = runner.git_commit(REPO)

    runs = [(model, model, []) for model in FLAGS.models or zoo.list_models()]
    runs += [parse_extra_run(spec) for spec in FLAGS.extra_run]
    labels = [label for label, _, _ in runs]
    if len(set(labels)) != len(labels):
        raise app.UsageError(f"Two rows share a label: {labels}; --extra_run labels must "
                             "differ from the models' names and from each other.")
    seeds = [int(s) for s in FLAGS.seeds]
    mn_seeds = [int(s) for s in FLAGS.mn_seeds] if FLAGS.mn_seeds is not None else seeds
    if not seeds or not mn_seeds:
        raise app.UsageError("--seeds and --mn_seeds need at least one seed each.")
    if FLAGS.mn_rows is None:
        mn_rows = {label for label, model, _ in runs if model in MN_MODELS}
    else:
        mn_rows = set(FLAGS.mn_rows)
        if mn_rows - set(labels):
            raise app.UsageError(f"--mn_rows: unknown rows {sorted(mn_rows - set(labels))}; "
                                 f"rows: {labels}.")
    mn_datasets = set(FLAGS.mn_datasets if FLAGS.mn_datasets is not None else FLAGS.datasets)
    if mn_datasets - set(FLAGS.datasets):
        raise app.UsageError(f"--mn_datasets: {sorted(mn_datasets - set(FLAGS.datasets))} "
                             f"not in --datasets={FLAGS.datasets}.")
    row_datasets = {}
    for spec in FLAGS.row_datasets:
        label, _, names = spec.partition("=")
        row_datasets[label] = names.split("+")
        if label not in labels or not names or set(row_datasets[label]) - set(FLAGS.datasets):
            raise app.UsageError(f"--row_datasets must be label=dataset[+dataset] with a row "
                                 f"label from {labels} and datasets from {FLAGS.datasets}. "
                                 f"Received: --row_datasets={spec!r}")
    datasets = prepare_data()
    metadata = {dataset: records.read_metadata(data_dir)
                for dataset, data_dir in datasets.items()}
    for dataset, meta in metadata.items():
        print(f"## {dataset}\n" + "\n".join(audit_lines(meta)), flush=True)
    results = {dataset: {label: [] for label in labels} for dataset in datasets}
    # Seed by seed, so an interrupted benchmark has whole tables of its first seeds.
    for seed in sorted(set(seeds) | set(mn_seeds), key=(seeds + mn_seeds).index):
        for dataset, data_dir in datasets.items():
            epochs = FLAGS.epochs if dataset in SIMULATED else FLAGS.ml_epochs
            for label, model, overrides in runs:
                fewer = label in mn_rows and dataset in mn_datasets
                if (seed not in (mn_seeds if fewer else seeds)
                        or dataset not in row_datasets.get(label, [dataset])):
                    continue
                run_dir = os.path.join(FLAGS.work_dir, "runs", dataset, label, f"seed{seed}")
                if FLAGS.read_only and not os.path.exists(os.path.join(run_dir,
                                                                       "metrics.json")):
                    continue
                metrics = run_one(model, seed, data_dir, run_dir, epochs, overrides)
                results[dataset][label].append(metrics)
                print(f"{dataset} {label} seed={seed}: "
                      + " ".join(f"{t}={v['auc']:.4f}"
                                 for t, v in metrics["eval"]["tasks"].items())
                      + f" ({metrics['wall_time_s']:.0f}s)", flush=True)
    write_report(results, metadata, runs, seeds,
                 (mn_seeds, [label for label in labels if label in mn_rows],
                  [dataset for dataset in datasets if dataset in mn_datasets]),
                 time.time() - started, commit)


def length_group_table(by_model, models, task, reference, metric="auc"):
    """Markdown: the task's `metric` (AUC or GAUC) per sequence-length group (mean +- std
    over seeds), the truth's AUC, and each model's gain over `reference` per group."""
    groups = by_model[models[0]][0]["eval"].get("by_sequence_length") or []
    if not groups or not all(r["eval"].get("by_sequence_length")
                             and metric in r["eval"]["by_sequence_length"][0]["tasks"][task]
                             for m in models for r in by_model[m]):
        return [], None
    heads = [f"n {g['min_length']:,}-{g['max_length']:,} ({g['num_requests']} requests)"
             for g in groups]
    per_model = {m: np.array([[g["tasks"][task][metric]
                               for g in r["eval"]["by_sequence_length"]]
                              for r in by_model[m]]) for m in models}
    name = metric.upper()
    lines = [f"| Model ({task} {name}) | " + " | ".join(heads) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for model in models:
        values = per_model[model]
        lines.append(f"| {model} | " + " | ".join(
            format_mean_std(mean, std, len(values))
            for mean, std in zip(values.mean(0), values.std(0))) + " |")
    if metric == "auc" and "truth_auc" in groups[0]["tasks"][task]:
        lines.append("| *ground truth* | " + " | ".join(
            f"{g['tasks'][task]['truth_auc']:.4f}" for g in groups) + " |")
    if reference in per_model:
        base = per_model[reference].mean(0)
        lines += ["", f"Gain over `{reference}` ({task} {name} points, mean over seeds):", "",
                  "| Model | " + " | ".join(heads) + " |", "|---" * (len(groups) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(f"{100 * (v - b):+.2f}" for v, b in
                                          zip(per_model[m].mean(0), base)) + " |"
                  for m in models if m != reference]
    return lines, {"heads": heads, "auc": {m: per_model[m].mean(0) for m in models}}


def plot_by_length(by_dataset, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_dataset), figsize=(7 * len(by_dataset), 4.5),
                             squeeze=False)
    for ax, (dataset, (task, groups)) in zip(axes[0], by_dataset.items()):
        x = np.arange(len(groups["heads"]))
        for i, (model, values) in enumerate(groups["auc"].items()):
            # Ten colours, then the same colours dashed: every line stays distinct.
            ax.plot(x, values, marker="o", color=f"C{i % 10}",
                    linestyle="-" if i < 10 else "--", label=model)
        ax.set_xticks(x)
        ax.set_xticklabels([h.split(" (")[0] for h in groups["heads"]], fontsize=8)
        ax.set_xlabel("test users by sequence length (equal-size groups)")
        ax.set_ylabel(f"{task} AUC (mean over seeds)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_feature_map(config, prefix=""):
    """`"relu"`, `"focused p=2"`, `"elu_plus_one, learned temperature"`, ...: a linear
    attention's map and sharpness from a config holding `<prefix>feature_map` etc."""
    feature_map = config[prefix + "feature_map"]
    text = feature_map
    if feature_map == "focused" and config.get(prefix + "focusing_factor") is not None:
        text += f" p={config[prefix + 'focusing_factor']}"
    if config.get(prefix + "learnable_temperature"):
        text += ", learned temperature"
    if config.get(prefix + "learnable_focusing_factor"):
        text += ", learned p"
    return text


def range_and_mechanism(runs):
    """`{label: (mechanism, events read)}` of the rows of `MECHANISMS`' models: the sequence
    module's own settings, as built from the config each row trained with."""
    from ifa_tf import training, zoo

    described = {}
    for label, model, overrides in runs:
        if model not in MECHANISMS:
            continue
        settings = training.load_config(
            model, overrides=[*budget_overrides(model, 1), *overrides]).model.overrides
        built = zoo.build(model, **settings)
        interest = built.get_layer("interest").get_config()
        mechanism = MECHANISMS[model]
        if "{fsm}" in mechanism:  # the linear attentions: their maps and options
            mechanism = mechanism.format(
                fsm=describe_feature_map(interest) + (
                    ", exact matches" if interest.get("exact_matches") else ""),
                ram=describe_feature_map(built.get_config(), prefix="ram_"))
        described[label] = (mechanism,
                            "every event" if interest["k"] is None
                            else f"the {interest['k']} most recent")
    return described


def write_report(results, metadata, runs, seeds, mn, wall_time, commit):
    """`runs`: the rows as (label, model, overrides); `mn`: (`--mn_seeds`, the rows that ran
    them, the datasets where they did)."""
    from ifa_tf.data import format_ceiling_ladder, read_ceiling_ladder

    models = [label for label, _, _ in runs]
    reads = range_and_mechanism(runs)
    mn_seeds, mn_rows, mn_datasets = mn
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    run_time = sum(r["wall_time_s"] for by_model in results.values()
                   for runs in by_model.values() for r in runs)
    from ifa_tf.benchmark import runner

    command = runner.script_command(__file__)
    lines = [
        "# Zoo results",
        "",
        "Produced by `benchmarks/zoo_results.py`; do not edit by hand.",
        "",
        f"- Command: `{command}`",
        f"- Commit: `{commit}` (at the start of this invocation; runs read back from "
        "`work_dir` ran at the commit of the invocation that made them)",
        f"- Wall time: {wall_time / 60:.1f} min for this invocation (runs finished earlier "
        f"are read back from `work_dir`); the runs themselves took {run_time / 60:.1f} min "
        f"(CPU, {os.cpu_count()} cores)",
        f"- Seeds: {seeds}"
        + (f" ({mn_seeds} for the rows {', '.join(mn_rows)}"
           + (f" on {', '.join(mn_datasets)}" if len(mn_datasets) < len(results) else "")
           + ": time forced fewer runs of them)"
           if mn_rows and mn_datasets and mn_seeds != seeds else "")
        + f"; every model: {FLAGS.epochs} epoch(s) on simulated data, "
        f"{FLAGS.ml_epochs} on MovieLens, batch {FLAGS.batch_size}"
        + (f" (requests of like length batched together, {FLAGS.group_by_length} batches "
           "sorted at a time)" if FLAGS.group_by_length else "") + ", "
        f"k = {FLAGS.k} for the sampling baselines, other settings from `zoo/<model>.yaml`"
        + (f", overrides {list(FLAGS.set)}" if FLAGS.set else "") + ".",
        "- Protocol `split`: train on the earlier requests (`train`), evaluate on the later "
        "ones (`test`). AUC over all valid candidates of the test requests (paper 5.1) and "
        "GAUC (per-request AUC, weighted by the request's candidates, one-class requests "
        "skipped: no request-level signal moves it), mean ± std over seeds; bold = best "
        "mean per column.",
        "- Leak audit: each dataset's model-free scores on the test split (from its "
        "`metadata.json`), the floor a model has to clear.",
        "- Ceiling ladder (simulated data): the truth AUC when the simulator's own truth is "
        "recomputed from only the history each family of models reads; a yardstick, not a "
        "strict bound (`ifa_tf.data.read_ceiling_ladder`).",
        "",
    ]
    plots, wall, by_length = {}, {}, {}
    for dataset, by_model in results.items():
        meta = metadata[dataset]
        # The rows that ran here (`--row_datasets` keeps some off a dataset).
        by_model = {m: r for m, r in by_model.items() if r}
        rows, absent = list(by_model), [m for m in models if m not in by_model]
        tasks = list(meta["schema"]["tasks"])
        table = summarise(by_model, tasks, "auc")
        first = by_model[rows[0]][0]["eval"]["tasks"]
        truth = ({t: first[t]["truth_auc"] for t in tasks}
                 if "truth_auc" in first[tasks[0]] else None)
        plots[dataset] = (table, truth)
        wall[dataset] = {m: float(np.mean([r["wall_time_s"] for r in by_model[m]]))
                         for m in rows}
        split = meta["splits"]
        lines += [f"## {dataset}", "",
                  f"Train {split['train']['num_requests']} requests, test "
                  f"{split['test']['num_requests']} requests; mean n "
                  f"{split['test'].get('mean_seq_len', float('nan')):.0f}, mean m "
                  f"{split['test'].get('mean_candidates', float('nan')):.0f} (test split)."
                  + (f" Not run here ({'no finished run' if FLAGS.read_only else '`--row_datasets`'}):"
                     f" {', '.join(absent)}." if absent else ""), ""]
        ladder = read_ceiling_ladder(meta)
        if ladder:
            lines += ["### Ceiling ladder (test split)", "",
                      format_ceiling_ladder(ladder, [t for t in tasks if t != "impression"]),
                      ""]
        lines += audit_lines(meta)
        gauc = summarise(by_model, tasks, "gauc")
        lines += ["### Table 2: AUC and GAUC of all models", "",
                  markdown_table(table, tasks, rows, truth=truth, gauc=gauc), ""]
        task = "click" if "click" in tasks else tasks[0]
        length_lines, groups = length_group_table(by_model, rows, task,
                                                  FLAGS.length_reference)
        if groups:
            by_length[dataset] = (task, groups)
            lines += ["### AUC by sequence length (short to long users)", ""] + length_lines
            lines.append("")
        gauc_lines, _ = length_group_table(by_model, rows, task, FLAGS.length_reference,
                                           metric="gauc")
        if gauc_lines:
            lines += ["### GAUC by sequence length", ""] + gauc_lines + [""]
        ablations = [m for m in ABLATIONS if m in rows]
        if len(ablations) > 1:
            lines += ["### Table 3: ablations", "",
                      markdown_table(table, tasks, ablations, names=ABLATION_NAMES,
                                     gauc=gauc), ""]
        here = [m for m in reads if m in by_model]
        if len(here) > 1:
            lines += ["### Range and mechanism", "",
                      "The attention models by how they weigh events and which events they "
                      f"read; rows that differ in one column isolate it ({task} AUC).", "",
                      f"| Model | weighs events by | reads | {task.capitalize()} AUC | "
                      f"{task.capitalize()} GAUC |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {reads[m][0]} | {reads[m][1]} | "
                      f"{format_mean_std(*table[m][task])} | "
                      f"{format_mean_std(*gauc[m][task])} |" for m in here]
            lines.append("")
        for metric, title in (("ndcg@10", "NDCG@10"),
                              ("logloss", "Log loss (lower is better)")):
            if metric not in first[tasks[0]]:
                continue
            lines += [f"### {title}", "",
                      markdown_table(summarise(by_model, tasks, metric), tasks, rows,
                                     lower_is_better=metric == "logloss"), ""]
        if truth:
            gap = summarise(by_model, tasks, "auc_gap_to_truth")
            lines += ["### Gap to ground truth (truth AUC - model AUC; lower is better)", "",
                      "| Model | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
            lines += [f"| {m} | " + " | ".join(f"{gap[m][t][0]:.4f}" for t in tasks) + " |"
                      for m in rows]
            lines.append("")
        lines += ["### Ordering found", "", ORDERING_NOTE, ""]
        for metric in ("gauc", "auc"):
            name = metric.upper()
            lines.append(f"- Best by {name} per task: " + ", ".join(
                f"{t}: {ordering(per_seed(by_model, [t], metric), first_only=True)}"
                for t in tasks) + ".")
            lines.append(f"- By mean {name} over tasks: "
                         + ordering(per_seed(by_model, tasks, metric)) + ".")
        lines.append("")
    plot(plots, models, os.path.join(FLAGS.output_dir, "results_auc.png"))
    if by_length:
        plot_by_length(by_length, os.path.join(FLAGS.output_dir, "results_auc_by_length.png"))
        lines += ["## AUC by sequence length", "",
                  "![AUC by sequence length](results_auc_by_length.png)", ""]
    plot_time(wall, models, os.path.join(FLAGS.output_dir, "results_wall_time.png"))
    lines += ["## Plots", "", "![AUC per model](results_auc.png)", "",
              "![Wall time per model](results_wall_time.png)", "",
              "| Model | " + " | ".join(f"{d} s/run" for d in wall) + " |",
              "|" + "---|" * (len(wall) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{wall[d][m]:.0f}" if m in wall[d] else "–"
                                      for d in wall) + " |" for m in models]
    with open(os.path.join(FLAGS.output_dir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
