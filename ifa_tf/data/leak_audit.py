"""Leak audit: what scores that know nothing of the user reach on a split's candidate sets.

A benchmark built from logs can give its labels away through the way its candidate sets are
made: a set whose size grows with the number of positives, negatives that are less popular
or less coherent than the positives, negatives drawn from items the user already consumed
where a positive never is. A model then learns the construction, not the user. The audit
scores every candidate of a split with model-free scores and reports, per task, their
pooled AUC (the paper's metric, over all candidates of all requests) and GAUC (the
candidate-weighted mean of per-request AUCs, `ifa_tf.metrics.grouped_auc`):

- `set_size`: the request's number of candidates. A constant within a request, so its GAUC
  is 0.5 by construction; its pooled AUC must be 0.5 too (within `SET_SIZE_TOLERANCE`), or
  the set's size tells how many positives it holds.
- `popularity`: how often the item is a positive (impression) in the train split.
- `set_popularity`: the mean `popularity` of the request's candidates, a constant within a
  request (GAUC 0.5): where its pooled AUC is off 0.5, how popular a set is tells how many
  positives it holds, and a model can raise its pooled AUC without ranking better.
- `in_history`: 1 when the candidate is in the request's sequence, else 0.
- `cooccurrence`: how similar the candidate is to the other candidates of its request, from
  train-split statistics alone (no user data): the sum of cosine similarities between the
  items' train co-occurrence profiles (which train requests held each as a positive),
  estimated from count sketches of `sketch_dim` signed buckets. High when the positives
  of a set form a coherent cluster and its negatives do not.

Beside them, one ceiling that is not model-free:

- `base_rate_oracle`: the request's own positive rate of the task, read from its labels:
  a constant within a request (GAUC 0.5) that ranks nothing. Its pooled AUC is what
  knowing exactly how many positives each request holds earns: where the sets hold
  different numbers of positives (a fixed set size with a varying window, as in logs),
  a model's pooled AUC can climb towards it without ranking any better.

Read the model-free scores as a floor: a model that does no better than one of these scores has learned
what the construction gives away. Popularity and "in the history" can be genuine signals
(users do re-engage items; popular items are liked more), which is why GAUC stands beside
pooled AUC: no request-level property (set size, a user's activity) moves GAUC.
"""

import numpy as np

from ifa_tf import metrics

SCORES = ("set_size", "popularity", "set_popularity", "in_history", "cooccurrence",
          "base_rate_oracle")
SET_SIZE_TOLERANCE = 0.01
_DEFAULT_SKETCH_DIM = 512


class LeakAudit:
    """Accumulates train requests (statistics) and test requests (the audited split), then
    scores the test candidates at `result()`.

    Args:
        tasks: the label names audited (each a [m] 0/1 array in a request).
        positive_task: the task whose positives make the train statistics (popularity and
            co-occurrence): the first task, `impression`, by default.
        sketch_dim: buckets of the co-occurrence count sketches.
        seed: fixes the sketches' hash.
    """

    def __init__(self, tasks, positive_task=None, sketch_dim=_DEFAULT_SKETCH_DIM, seed=0):
        self.tasks = tuple(tasks)
        self.positive_task = positive_task or self.tasks[0]
        if self.positive_task not in self.tasks:
            raise ValueError(f"LeakAudit: positive_task must be one of {list(self.tasks)}. "
                             f"Received: positive_task={positive_task!r}")
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ValueError("LeakAudit: sketch_dim must be a positive integer. "
                             f"Received: sketch_dim={sketch_dim!r}")
        self.sketch_dim, self.seed = sketch_dim, seed
        self._train_items = []  # per train request: its positive items
        self._test = []  # per test request: (candidates, in_history, {task: labels})

    def add_train(self, request):
        labels = np.asarray(request[self.positive_task]) > 0
        self._train_items.append(np.unique(np.asarray(request["cand_item_id"])[labels]))

    def add_test(self, request):
        candidates = np.asarray(request["cand_item_id"], np.int64)
        in_history = np.isin(candidates, np.asarray(request["seq_item_id"], np.int64))
        labels = {task: np.asarray(request[task], np.int64) for task in self.tasks}
        self._test.append((candidates, in_history, labels))

    def result(self):
        """`{"num_requests", "num_candidates", "scores": {score: {task: {"auc", "gauc"}}}}`
        over the test requests; None when there are none."""
        if not self._test:
            return None
        candidates = [c for c, _, _ in self._test]
        sizes = np.array([len(c) for c in candidates])
        groups = np.repeat(np.arange(len(candidates)), sizes)
        items = np.concatenate(candidates)
        popularity = self._popularity(items)
        scores = {
            "set_size": np.repeat(sizes, sizes).astype(np.float64),
            "popularity": popularity,
            "set_popularity": np.repeat(
                np.bincount(groups, weights=popularity) / sizes, sizes),
            "in_history": np.concatenate([h for _, h, _ in self._test]).astype(np.float64),
            "cooccurrence": self._cooccurrence(candidates),
        }
        labels = {task: np.concatenate([l[task] for _, _, l in self._test])
                  for task in self.tasks}
        table = {}
        for task, task_labels in labels.items():
            base_rate = np.repeat(np.bincount(groups, weights=task_labels) / sizes, sizes)
            for name, score in {**scores, "base_rate_oracle": base_rate}.items():
                gauc, _ = metrics.grouped_auc(task_labels, score, groups)
                table.setdefault(name, {})[task] = {
                    "auc": _rounded(metrics.auc(task_labels, score)), "gauc": _rounded(gauc)}
        return {"num_requests": len(candidates), "num_candidates": int(sizes.sum()),
                "positive_task": self.positive_task, "scores": table}

    def _popularity(self, items):
        if not self._train_items:
            return np.zeros(len(items), np.float64)
        known, counts = np.unique(np.concatenate(self._train_items), return_counts=True)
        if not len(known):
            return np.zeros(len(items), np.float64)
        where = np.minimum(np.searchsorted(known, items), len(known) - 1)
        return np.where(known[where] == items, counts[where], 0).astype(np.float64)

    def _cooccurrence(self, candidates):
        """Per candidate: the sum over the other candidates of its request of the cosine
        similarity of their train co-occurrence profiles (count-sketched)."""
        audited = np.unique(np.concatenate(candidates))
        rng = np.random.default_rng(self.seed)
        num_train = len(self._train_items)
        buckets = rng.integers(0, self.sketch_dim, num_train)
        signs = rng.choice(np.array([-1.0, 1.0]), num_train)
        profiles = np.zeros((len(audited), self.sketch_dim), np.float64)
        if num_train:
            request = np.repeat(np.arange(num_train), [len(i) for i in self._train_items])
            items = np.concatenate(self._train_items)
            row = np.searchsorted(audited, items)
            keep = (row < len(audited)) & (audited[np.minimum(row, len(audited) - 1)] == items)
            np.add.at(profiles, (row[keep], buckets[request[keep]]), signs[request[keep]])
        norms = np.linalg.norm(profiles, axis=1, keepdims=True)
        profiles = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
        scores = []
        for items in candidates:
            vectors = profiles[np.searchsorted(audited, items)]
            scores.append(vectors @ vectors.sum(axis=0) - np.einsum("ij,ij->i", vectors,
                                                                    vectors))
        return np.concatenate(scores)


def _rounded(value):
    return None if value is None or np.isnan(value) else round(float(value), 4)


def set_size_warning(audit):
    """One line when set size alone scores a pooled AUC outside 0.5 ± `SET_SIZE_TOLERANCE`
    on some task (the sets' composition tells their labels), else None."""
    if not audit:
        return None
    off = {task: value["auc"] for task, value in audit["scores"]["set_size"].items()
           if value["auc"] is not None and abs(value["auc"] - 0.5) > SET_SIZE_TOLERANCE}
    if not off:
        return None
    shown = ", ".join(f"{task} {auc:.3f}" for task, auc in off.items())
    return (f"leak audit: set size alone scores pooled AUC {shown} on the test split "
            f"(0.5 ± {SET_SIZE_TOLERANCE} expected): the candidate sets' size tells their "
            "labels; pooled AUC on this data measures the construction (see metadata.json "
            "leak_audit; use a fixed set size)")


def summary(audit, task=None):
    """One line for a command's output: each score's pooled AUC / GAUC on `task` (the
    first action task by default, else the first), or None without an audit."""
    if not audit:
        return None
    tasks = list(audit["scores"]["set_size"])
    task = task or (tasks[1] if len(tasks) > 1 else tasks[0])
    cells = ", ".join(
        f"{name} {_shown(audit['scores'][name][task]['auc'])} / "
        f"{_shown(audit['scores'][name][task]['gauc'])}"
        for name in SCORES if name in audit["scores"] and name != "base_rate_oracle")
    oracle = audit["scores"].get("base_rate_oracle")
    ceiling = (f"; knowing each request's positive rate alone: {_shown(oracle[task]['auc'])}"
               if oracle else "")
    return (f"leak audit, test {task} AUC / GAUC of model-free scores: {cells}{ceiling} "
            "(metadata.json: leak_audit)")


def _shown(value):
    return "n/a" if value is None else f"{value:.3f}"


def format_leak_audit(audit, tasks=None):
    """A Markdown table of an audit: one row per score (the model-free ones, then the base
    rate oracle), pooled AUC / GAUC per task."""
    tasks = list(tasks or next(iter(audit["scores"].values())))
    lines = ["| score | " + " | ".join(f"{t} AUC / GAUC" for t in tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for name in [s for s in SCORES if s in audit["scores"]]:
        by_task = audit["scores"][name]
        cells = [f"{_shown(by_task[t]['auc'])} / {_shown(by_task[t]['gauc'])}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
