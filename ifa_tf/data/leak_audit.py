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

import fractions

import numpy as np

from ifa_tf import metrics
from ifa_tf.data import log_statistics

SCORES = ("set_size", "popularity", "set_popularity", "in_history", "cooccurrence",
          "base_rate_oracle")
SET_SIZE_TOLERANCE = 0.01
_DEFAULT_SKETCH_DIM = 512
_COMPACT_AT = 1 << 20


class LeakAudit:
    """Accumulates train requests (statistics) and test requests (the audited split), then
    scores the test candidates at `result()`.

    The work is done by plain pieces that the Beam pipeline runs over its workers as well
    (`beam_pipeline`): `TrainStatistics` (popularity and co-occurrence sketches of the train
    requests, each request hashed by its index in the train split), `score_request` (one
    test request's model-free scores), `ScoreHistogram` / `pooled_auc` (pooled AUC from
    counts per score value, exact) and `GroupedAUC` (GAUC, summed exactly).

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
        self._train_items.append(train_positives(request, self.positive_task))

    def add_test(self, request):
        self._test.append(test_entry(request, self.tasks))

    def result(self):
        """`{"num_requests", "num_candidates", "scores": {score: {task: {"auc", "gauc"}}}}`
        over the test requests; None when there are none."""
        if not self._test:
            return None
        statistics = TrainStatistics(*sketch_hashes(self.seed, self.sketch_dim,
                                                    len(self._train_items)), self.sketch_dim)
        for index, items in enumerate(self._train_items):
            statistics.add(items, index)
        lookup = statistics.lookup()
        totals = AuditTotals(self.tasks)
        histograms = {name: ScoreHistogram(self.tasks) for name in SCORES}
        for candidates, in_history, labels in self._test:
            scores = score_request(candidates, in_history, labels, lookup)
            totals.add(scores, labels)
            for name, values, counted in histogram_inputs(scores, labels):
                histograms[name].add(values, counted)
        return totals.result({name: {0: histogram.terms()}
                              for name, histogram in histograms.items()},
                             self.positive_task)


# ----------------------------------------------------------------------- train statistics
def train_positives(request, positive_task):
    """The distinct items of a train request that are positives of `positive_task`."""
    labels = np.asarray(request[positive_task]) > 0
    return np.unique(np.asarray(request["cand_item_id"])[labels])


def sketch_hashes(seed, sketch_dim, num_train):
    """`(buckets, signs)` of the co-occurrence sketches: the bucket and sign of each train
    request, by its index in the train split (requests by user, then time)."""
    rng = np.random.default_rng(seed)
    buckets = rng.integers(0, sketch_dim, num_train)
    signs = rng.choice(np.array([-1.0, 1.0]), num_train)
    return buckets, signs


class TrainStatistics:
    """What the audit knows of the train split: how often each item is a positive of a train
    request (`popularity`), and each item's co-occurrence profile: the count sketch of which
    train requests held it as a positive (request `index` adds its sign to its bucket, from
    `sketch_hashes`). `add` a request's positives, `merge` another, `lookup()` the scores'
    tables. Profiles are sums of +-1, kept as int32 (exact, in any order; half the memory
    of the float64 they are scored in)."""

    def __init__(self, buckets, signs, sketch_dim):
        self.buckets, self.signs, self.sketch_dim = buckets, signs, sketch_dim
        self.popularity = log_statistics.ItemCounts()
        self._items = np.zeros(0, np.int64)
        self._profiles = np.zeros((0, sketch_dim), np.int32)
        self._pending = []  # (items, index)
        self._num_pending = 0

    def add(self, items, index):
        items = np.asarray(items, np.int64)
        self.popularity.add(items, np.ones(len(items), np.int64))
        self._pending.append((items, index))
        self._num_pending += len(items)
        if self._num_pending > _COMPACT_AT:
            self._compact()
        return self

    def merge(self, other):
        self.popularity.merge(other.popularity)
        other._compact()
        self._compact()
        self._items, self._profiles = _add_rows(self._items, self._profiles, other._items,
                                                other._profiles)
        return self

    def lookup(self):
        """`AuditLookup` of the scores: popularity, and the profiles with their norms."""
        self._compact()
        norms = np.zeros(len(self._items), np.float64)
        for start in range(0, len(self._items), 4096):  # exact integer sums of squares
            rows = self._profiles[start:start + 4096].astype(np.int64)
            norms[start:start + 4096] = np.sqrt(np.sum(rows * rows, axis=1).astype(np.float64))
        return AuditLookup(*self.popularity.result(), self._items, self._profiles, norms)

    def __getstate__(self):  # pickled between workers without the hash tables
        self._compact()
        return {**self.__dict__, "buckets": None, "signs": None}

    def _compact(self):
        if not self._pending:
            return
        items = np.concatenate([i for i, _ in self._pending])
        requests = np.repeat(np.array([index for _, index in self._pending], np.int64),
                             [len(i) for i, _ in self._pending])
        self._pending, self._num_pending = [], 0
        found, row = np.unique(items, return_inverse=True)
        profiles = np.zeros((len(found), self.sketch_dim), np.int32)
        np.add.at(profiles, (row, self.buckets[requests]), self.signs[requests].astype(np.int32))
        self._items, self._profiles = _add_rows(self._items, self._profiles, found, profiles)


def _add_rows(items, rows, other_items, other_rows):
    """The union of two `(sorted items, rows)` tables, rows of one item added."""
    if not len(items):
        return other_items, other_rows
    if not len(other_items):
        return items, rows
    union = np.union1d(items, other_items)
    table = np.zeros((len(union), rows.shape[1]), rows.dtype)
    table[np.searchsorted(union, items)] += rows
    table[np.searchsorted(union, other_items)] += other_rows
    return union, table


class AuditLookup:
    """The train statistics a test request's scores read: popularity (`known` items and
    their `counts`) and the profiles of `profile_items` (`profiles`, one integer row each,
    and their `norms`); a score reads a profile normalised (float64), and items without one
    a zero profile."""

    def __init__(self, known, counts, profile_items, profiles, norms):
        self.known, self.counts = known, counts
        self.profile_items, self.profiles, self.norms = profile_items, profiles, norms

    def popularity(self, items):
        if not len(self.known):
            return np.zeros(len(items), np.float64)
        where = np.minimum(np.searchsorted(self.known, items), len(self.known) - 1)
        return np.where(self.known[where] == items, self.counts[where], 0).astype(np.float64)

    def profile(self, items):
        vectors = np.zeros((len(items), self.profiles.shape[1]), np.float64)
        if len(self.profile_items):
            where = np.minimum(np.searchsorted(self.profile_items, items),
                               len(self.profile_items) - 1)
            found = (self.profile_items[where] == items) & (self.norms[where] > 0)
            rows = where[found]
            vectors[found] = self.profiles[rows].astype(np.float64) / self.norms[rows, None]
        return vectors


# --------------------------------------------------------------------------- test scores
def test_entry(request, tasks):
    """What the audit keeps of a test request: `(candidates, in_history, {task: labels})`."""
    candidates = np.asarray(request["cand_item_id"], np.int64)
    in_history = np.isin(candidates, np.asarray(request["seq_item_id"], np.int64))
    labels = {task: np.asarray(request[task], np.int64) for task in tasks}
    return candidates, in_history, labels


def score_request(candidates, in_history, labels, lookup):
    """`{score: [m] float64}` of one test request: its model-free scores (and the base
    rate oracle's per task, `base_rate_oracle/<task>`)."""
    size = len(candidates)
    popularity = lookup.popularity(candidates)
    vectors = lookup.profile(candidates)
    scores = {
        "set_size": np.full(size, float(size)),
        "popularity": popularity,
        "set_popularity": np.full(size, popularity.sum() / size),
        "in_history": in_history.astype(np.float64),
        "cooccurrence": vectors @ vectors.sum(axis=0) - np.einsum("ij,ij->i", vectors,
                                                                   vectors),
    }
    for task, task_labels in labels.items():
        scores[f"base_rate_oracle/{task}"] = np.full(size, task_labels.sum() / size)
    return scores


def score_name(key):
    """The audit's score name of a `score_request` key (the oracle's per-task keys)."""
    return key.split("/")[0]


def histogram_inputs(scores, labels):
    """Yields `(score, values, labels)` for the `ScoreHistogram`s of one request's scores:
    the base rate oracle of a task counts the labels of that task only."""
    for key, values in scores.items():
        name = score_name(key)
        yield name, values, (labels if name == key else
                             {key.split("/", 1)[1]: labels[key.split("/", 1)[1]]})


class ScoreHistogram:
    """Pooled AUC of one score by counts: per distinct score value, the positives and
    negatives of each task. `add`, `merge`, `terms()`: per task `(positives, negatives,
    2U)`, U the Mann-Whitney statistic (ties one half): integers, so the AUC
    `U / (positives * negatives)` is exactly `metrics.auc`'s, however the counts were
    split and merged. Histograms of disjoint ranges of values combine by `pooled_auc`."""

    def __init__(self, tasks):
        self.tasks = tuple(tasks)
        self._values, self._positives, self._negatives = [], [], []
        self._num_pending, self._compacted = 0, True
        self._size = 0  # distinct values after the last compaction

    def add(self, scores, labels):
        """`scores` [k] float64 with `labels` `{task: [k] 0/1}` (a `base_rate_oracle/<task>`
        key of `score_request` brings the labels of its own task only: the others count
        nothing)."""
        return self.add_matrix(scores, label_matrix(self.tasks, labels, len(scores)))

    def add_matrix(self, scores, labels):
        """`scores` [k] with `labels` [tasks, k]: 1 positive, 0 negative, -1 not counted."""
        scores = np.asarray(scores, np.float64)
        self._values.append(scores)
        self._positives.append((labels == 1).astype(np.int64))
        self._negatives.append((labels == 0).astype(np.int64))
        self._num_pending += len(scores)
        self._compacted = False
        if self._num_pending > max(_COMPACT_AT, self._size):  # amortised: linear in all
            self._compact()
        return self

    def merge(self, other):
        self._values += other._values
        self._positives += other._positives
        self._negatives += other._negatives
        self._num_pending += sum(len(values) for values in other._values)
        self._compacted = self._compacted and other._compacted and len(self._values) <= 1
        if self._num_pending > max(_COMPACT_AT, self._size):
            self._compact()
        return self

    def __len__(self):
        self._compact()
        return len(self._values[0]) if self._values else 0

    def terms(self):
        """`{task: (positives, negatives, twice_u)}` within this histogram."""
        self._compact()
        if not self._values:
            return {t: (0, 0, 0) for t in self.tasks}
        positives, negatives = self._positives[0], self._negatives[0]
        below = np.cumsum(negatives, axis=1) - negatives
        twice_u = np.sum(positives * (2 * below + negatives), axis=1)
        return {task: (int(positives[i].sum()), int(negatives[i].sum()), int(twice_u[i]))
                for i, task in enumerate(self.tasks)}

    def _compact(self):
        if self._compacted:
            return
        values, inverse = np.unique(np.concatenate(self._values), return_inverse=True)
        positives = np.zeros((len(self.tasks), len(values)), np.int64)
        negatives = np.zeros_like(positives)
        for i in range(len(self.tasks)):
            positives[i] = np.bincount(inverse, np.concatenate([p[i] for p in self._positives]),
                                       len(values)).astype(np.int64)
            negatives[i] = np.bincount(inverse, np.concatenate([n[i] for n in self._negatives]),
                                       len(values)).astype(np.int64)
        self._values, self._positives, self._negatives = [values], [positives], [negatives]
        self._num_pending, self._compacted, self._size = 0, True, len(values)


def label_matrix(tasks, labels, size):
    """`[tasks, size]` int8 of `labels` (`{task: [size] 0/1}`): 1 positive, 0 negative, -1
    for a task `labels` does not hold (not counted)."""
    matrix = np.full((len(tasks), size), -1, np.int8)
    for i, task in enumerate(tasks):
        if task in labels:
            matrix[i] = np.asarray(labels[task]) > 0
    return matrix


def value_range(scores, bits=20):
    """The range of score values each score falls in: the top `bits` bits of an integer
    that orders like the float64 (the Beam pipeline counts each range in its own
    histogram, so no worker holds every distinct value)."""
    raw = (np.asarray(scores, np.float64) + 0.0).view(np.int64)  # -0.0 ties 0.0: one range
    ordered = np.where(raw < 0, ~raw, raw | np.int64(-2**63))  # sign bit flipped on >= 0
    return (ordered.view(np.uint64) >> np.uint64(64 - bits)).astype(np.int64)


def pooled_auc(parts):
    """`{task: AUC}` from the `terms()` of histograms of disjoint value ranges, given as
    `{range: terms}` (a positive of one range is above every negative of a lower range)."""
    result = {}
    tasks = next(iter(parts.values())).keys() if parts else ()
    for task in tasks:
        positives = negatives = twice_u = 0
        for key in sorted(parts):
            p, n, u = parts[key][task]
            twice_u += u + 2 * p * negatives
            positives += p
            negatives += n
        result[task] = (float("nan") if positives == 0 or negatives == 0
                        else float((twice_u / 2) / (positives * negatives)))
    return result


class GroupedAUC:
    """GAUC of one score and task: the candidate-weighted mean of per-request AUCs, one-class
    requests skipped (`metrics.grouped_auc`), summed exactly (the same value in any order
    of requests)."""

    def __init__(self):
        self.total, self.weight = fractions.Fraction(0), 0

    def add(self, labels, scores):
        value = metrics.auc(labels, scores)
        if not np.isnan(value):
            self.total += fractions.Fraction(value * len(labels))
            self.weight += len(labels)
        return self

    def merge(self, other):
        self.total += other.total
        self.weight += other.weight
        return self

    def result(self):
        return float(self.total / self.weight) if self.weight else float("nan")


class AuditTotals:
    """The audit's per-request sums: requests, candidates, and `GroupedAUC` of every score
    and task. `add` one request's `score_request` and labels, `merge`, and `result` with
    the pooled AUCs' histogram terms."""

    def __init__(self, tasks):
        self.tasks = tuple(tasks)
        self.num_requests = self.num_candidates = 0
        self.grouped = {(name, task): GroupedAUC() for name in SCORES for task in self.tasks}

    def add(self, scores, labels):
        self.num_requests += 1
        self.num_candidates += len(scores["set_size"])
        for key, values in scores.items():
            for task in self.tasks:
                if score_name(key) == "base_rate_oracle" and key != f"base_rate_oracle/{task}":
                    continue
                self.grouped[score_name(key), task].add(labels[task], values)
        return self

    def merge(self, other):
        self.num_requests += other.num_requests
        self.num_candidates += other.num_candidates
        for key, grouped in other.grouped.items():
            self.grouped[key].merge(grouped)
        return self

    def result(self, histogram_parts, positive_task):
        """The audit's figures; `histogram_parts`: `{score: {range: terms}}` of its
        `ScoreHistogram`s."""
        if not self.num_requests:
            return None
        table = {}
        for name in SCORES:
            aucs = pooled_auc(histogram_parts[name])
            for task in self.tasks:
                table.setdefault(name, {})[task] = {
                    "auc": _rounded(aucs[task]),
                    "gauc": _rounded(self.grouped[name, task].result())}
        return {"num_requests": self.num_requests, "num_candidates": self.num_candidates,
                "positive_task": positive_task, "scores": table}


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
