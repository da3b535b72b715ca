"""Where do trained models put their attention over the whole sequence?

For each trained full-sequence model (`din_full`'s softmax, `ifa`'s linear attention) this
reads the attention weights of its sequence module on a few test requests and reports how
spread they are (`ifa_tf.diagnostics.attention_concentration`) and whether they land on the
events that share the candidate's item, author or category
(`ifa_tf.diagnostics.weight_on_matches`): lift 1 means the model is blind to those events
(as uniform attention, or a mean, is). For models with RAM it also reports how spread the
candidates' attention over each other is, and for models with learnable sharpness what
each head learned (`ifa_tf.diagnostics.learned_sharpness`).

    python benchmarks/attention_probe.py --data='/tmp/zoo/data/lifelong/test-*' \\
        --model=din_full=/tmp/zoo/runs/lifelong/din_full/seed0/model.keras \\
        --model=ifa=/tmp/zoo/runs/lifelong/ifa/seed0/model.keras

Prints a Markdown table (and writes it to `--output` if given).
"""

import math
import os

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model", [], "label=path of a trained .keras model.")
flags.DEFINE_string("data", None, "Glob of the TFRecord requests to probe (e.g. the test split).")
flags.DEFINE_integer("requests", 48, "Requests probed (the first ones of --data).")
flags.DEFINE_integer("batch_size", 4, "Requests per forward pass.")
flags.DEFINE_string("output", None, "Also write the table to this file.")


def probe(model, dataset, signal_categories=()):
    """Per-(query, head) statistics of one model's sequence attention over `dataset`;
    `signal_categories`: the simulator's trait categories, if any."""
    from keras import ops

    from ifa_tf import diagnostics
    from ifa_tf.layers import NormalizedLinearAttention, masked_target_attention

    attention = getattr(model.interest, "_attention", None)
    linear = isinstance(attention, NormalizedLinearAttention)
    if attention is None or getattr(model.interest, "k", None) is not None:
        raise app.UsageError(f"{model.interest.name}: only models that attend over the whole "
                             "sequence (din_full, ifa, ifa_no_ram) can be probed.")
    captured = {}
    ram = next((layer for layer in model.layers
                if layer.name == "candidate_self_attention"), None)
    if ram is not None:
        ram_call = ram.call

        def capture_ram(candidates, candidate_mask=None):
            captured["ram_inputs"] = (candidates, candidate_mask)
            return ram_call(candidates, candidate_mask=candidate_mask)

        ram.call = capture_ram
    if linear:
        call = attention.call

        def capture_call(query, key, *args, **kwargs):
            captured["inputs"] = (query, key, kwargs.get("query_mask"), kwargs.get("key_mask"))
            return call(query, key, *args, **kwargs)

        attention.call = capture_call
    else:
        softmax = masked_target_attention.masked_softmax

        def capture_softmax(logits, mask, axis=-1):
            weights = softmax(logits, mask, axis)
            captured["logits"], captured["weights"] = logits, weights  # [B, m, h, n]
            return weights

        masked_target_attention.masked_softmax = capture_softmax
    stats = {key: [] for key in ("entropy_ratio", "top_share", "item_lift", "author_lift",
                                 "category_lift", "engaged_lift", "recent_lift",
                                 "signal_lift", "logit_std", "ram_entropy_ratio")}
    try:
        for features, _ in dataset:
            model(features, training=False)
            mask = ops.convert_to_numpy(features["seq_item_id"]) != 0
            candidates = ops.convert_to_numpy(features["cand_item_id"]) != 0
            if linear:
                query, key, query_mask, key_mask = captured["inputs"]
                weights = ops.convert_to_numpy(attention.attention_weights(
                    query, key, query_mask=query_mask, key_mask=key_mask))
            else:
                weights = np.transpose(ops.convert_to_numpy(captured["weights"]), (0, 2, 1, 3))
                logits = np.transpose(ops.convert_to_numpy(captured["logits"]), (0, 2, 1, 3))
                valid = np.broadcast_to(mask[:, None, None, :], logits.shape)
                spread = np.nanstd(np.where(valid, logits, np.nan), axis=-1)  # [B, h, m]
                stats["logit_std"].append(spread[np.broadcast_to(candidates[:, None, :],
                                                                 spread.shape)])
            if ram is not None:
                ram_candidates, ram_mask = captured["ram_inputs"]
                ram_weights = ops.convert_to_numpy(ram.attention_weights(
                    ram_candidates, ram_candidates, query_mask=ram_mask, key_mask=ram_mask))
                among = diagnostics.attention_concentration(ram_weights, candidates)
                stats["ram_entropy_ratio"].append(
                    (among["entropy"] / np.log(np.maximum(among["num_events"], 2)))[
                        ~np.isnan(among["entropy"])])
            concentration = diagnostics.attention_concentration(weights, mask)
            defined = ~np.isnan(concentration["entropy"])
            stats["entropy_ratio"].append(
                (concentration["entropy"] / np.log(np.maximum(concentration["num_events"],
                                                              2)))[defined])
            stats["top_share"].append(concentration["top_share"][defined])
            # Query-independent groups of events, as ids every valid candidate shares (1):
            # the events with a long view or a like, and the last 100 events.
            action = ops.convert_to_numpy(features["seq_action"])
            position_from_end = np.cumsum(mask[:, ::-1], axis=1)[:, ::-1]
            groups = {"engaged": action > 1, "recent": position_from_end <= 100,
                      "signal": np.isin(ops.convert_to_numpy(features["seq_category_id"]),
                                        signal_categories)}
            for name, members in groups.items():
                lift = diagnostics.weight_on_matches(
                    weights, candidates.astype(int),
                    np.where(members, 1, -1), mask)["lift"]
                stats[f"{name}_lift"].append(lift[~np.isnan(lift)])
            for attribute in ("item", "author", "category"):
                if f"cand_{attribute}_id" not in features:
                    continue  # a log without it (MovieLens has no authors)
                lift = diagnostics.weight_on_matches(
                    weights, ops.convert_to_numpy(features[f"cand_{attribute}_id"]),
                    ops.convert_to_numpy(features[f"seq_{attribute}_id"]), mask)["lift"]
                stats[f"{attribute}_lift"].append(lift[~np.isnan(lift)])
    finally:
        if ram is not None:
            del ram.call
        if linear:
            del attention.call
        else:
            masked_target_attention.masked_softmax = softmax
    return {key: np.concatenate(values) if values else np.array([])
            for key, values in stats.items()}


def _median(values):
    return f"{np.median(values):.3g}" if values.size else "—"


def _sharpness(model):
    """`FSM tau 0.41/1.2; RAM p 3.5/2.9`: what each head learned, or — without learnable
    sharpness."""
    from ifa_tf import diagnostics

    parts = []
    for path, learned in diagnostics.learned_sharpness(model).items():
        module = "RAM" if path.startswith("candidate_self_attention") else "FSM"
        for name, symbol in (("temperature", "tau"), ("focusing_factor", "p")):
            if name in learned:
                parts.append(f"{module} {symbol} " + "/".join(f"{v:.3g}"
                                                              for v in learned[name]))
    return "; ".join(parts) or "—"


def main(argv):
    del argv
    import keras

    from ifa_tf.benchmark import runner
    from ifa_tf.data import make_dataset, records

    if not FLAGS.model or not FLAGS.data:
        raise app.UsageError("--model=label=path (one or more) and --data are needed.")
    rows = ["| model | entropy / log n | weight on top 1% of events | lift on own-item events "
            "| lift on same-author events | lift on same-category events "
            "| lift on engaged events | lift on the last 100 events "
            "| lift on the trait's signal events | logit std over events "
            "| RAM: entropy / log m | learned sharpness per head |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    metadata = records.find_metadata(records.expand_file_pattern(FLAGS.data)) or {}
    signal_categories = metadata.get("generator", {}).get("signal_categories", [])
    for spec in FLAGS.model:
        label, _, path = spec.partition("=")
        model = keras.saving.load_model(path)
        dataset = make_dataset(FLAGS.data, batch_size=FLAGS.batch_size, shuffle=False,
                               deterministic=True).take(
            math.ceil(FLAGS.requests / FLAGS.batch_size))
        stats = probe(model, dataset, signal_categories)
        rows.append(f"| {label} | {_median(stats['entropy_ratio'])} | "
                    f"{_median(stats['top_share'])} | {_median(stats['item_lift'])} "
                    f"({stats['item_lift'].size}) | {_median(stats['author_lift'])} "
                    f"({stats['author_lift'].size}) | {_median(stats['category_lift'])} | "
                    f"{_median(stats['engaged_lift'])} | {_median(stats['recent_lift'])} | "
                    f"{_median(stats['signal_lift'])} | "
                    f"{_median(stats['logit_std'])} | {_median(stats['ram_entropy_ratio'])} | "
                    f"{_sharpness(model)} |")
    table = "\n".join(
        ["Written by `benchmarks/attention_probe.py`; do not edit by hand.", "",
         f"- Command: `{runner.script_command(__file__)}`",
         f"- Commit: `{runner.git_commit(REPO)}`", "",
         f"Medians over (candidate, head) pairs of the first {FLAGS.requests} requests of "
         f"`{FLAGS.data}`; lift = the weight's share on the matching events / their share "
         "of the events (1: blind to them; in brackets, the pairs that have matches); "
         "engaged events: a long view or a like (seq_action > 1); signal events: those in "
         f"the simulator's trait categories {signal_categories or '(none: not simulated)'}.",
         "",
         *rows])
    print(table)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
