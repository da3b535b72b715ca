"""Evaluation metrics over candidate sets, the way the IFA paper evaluates (section 5.1).

Every metric sees only valid candidates (`cand_item_id != 0`): padded positions are removed
before anything is computed. Per task:

- `auc`: AUC over all valid candidate positions of the evaluated requests pooled together
  (the paper's protocol: "items with user actions are labeled as positive and candidate
  items without user actions are labeled as negative"). Exact, ties count one half
  (average ranks, the Mann-Whitney U statistic).
- `gauc`: the mean of per-request AUCs, each weighted by the request's number of valid
  candidates (candidate-weighted; every candidate of a request is a ranked item, so this is
  the candidate-set analogue of impression-weighted GAUC). Requests whose valid labels are
  all one class have no AUC and are skipped.
- `ndcg@k`: NDCG@k per request by keras-rs (`keras_rs.metrics.NDCG`, gain 2^y - 1,
  discount 1 / log2(rank + 1)), averaged over requests with at least one positive
  (requests without one have no ideal DCG and are skipped).
- `logloss`: binary cross-entropy averaged over valid candidates.
- `truth_auc` (when the data carries the simulator's `truth_<task>`): the AUC of the
  ground-truth probabilities, the best any model can reach; `auc_gap_to_truth` is
  `truth_auc - auc`.

`CandidateSetEvaluator` accumulates batches and computes everything at `result()`; the
functions `auc`, `grouped_auc`, `ndcg_at_k` and `log_loss` work on NumPy arrays directly.
With `length_groups=g` it also splits the requests into g groups of (about) equal size by
their sequence length n (short to long users) and gives each group's AUC and truth AUC
(`length_group_result()`): whether a model's gain grows with n.
"""

import numpy as np

TRUTH_PREFIX = "truth_"
_LOG_LOSS_EPSILON = 1e-7


def auc(labels, scores):
    """Exact ROC AUC of binary `labels` against `scores` (1-D), ties counted as one half.

    Returns NaN when the labels are all one class.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    scores = np.asarray(scores, dtype=np.float64).ravel()
    num_positive = int(labels.sum())
    num_negative = labels.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = ranks[labels].sum()
    u_statistic = rank_sum - num_positive * (num_positive + 1) / 2.0
    return float(u_statistic / (num_positive * num_negative))


def grouped_auc(labels, scores, groups):
    """Candidate-weighted mean of per-group AUCs, skipping one-class groups.

    Returns `(gauc, num_groups_used)`; GAUC is NaN when no group has both classes.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    groups = np.asarray(groups).ravel()
    order = np.argsort(groups, kind="stable")
    boundaries = np.flatnonzero(np.diff(groups[order])) + 1
    total, weight, used = 0.0, 0.0, 0
    for indices in np.split(order, boundaries):
        if indices.size == 0:
            continue
        value = auc(labels[indices], scores[indices])
        if np.isnan(value):
            continue
        total += value * indices.size
        weight += indices.size
        used += 1
    return (total / weight if weight else float("nan")), used


def log_loss(labels, probabilities):
    """Mean binary cross-entropy; probabilities clipped to [1e-7, 1 - 1e-7]."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), _LOG_LOSS_EPSILON,
                1.0 - _LOG_LOSS_EPSILON)
    if labels.size == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)))


def ndcg_at_k(labels, scores, candidate_mask, k):
    """NDCG@k of [B, m] lists by keras-rs, padded candidates excluded.

    Returns `(ndcg, num_lists_used)`: the mean over lists with at least one valid positive.
    """
    import keras_rs

    labels = np.asarray(labels, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    mask = np.asarray(candidate_mask, dtype=bool)
    has_positive = ((labels > 0) & mask).any(axis=1)
    if not has_positive.any():
        return float("nan"), 0
    labels, scores, mask = labels[has_positive], scores[has_positive], mask[has_positive]
    # keras-rs drops items whose mask is False from the ranking (and the ideal ranking);
    # the list weight (1-D sample_weight) makes the result a plain mean over lists.
    metric = keras_rs.metrics.NDCG(k=k, shuffle_ties=False)
    metric.update_state({"labels": labels, "mask": mask}, scores,
                        sample_weight=np.ones(len(labels), np.float32))
    return float(np.asarray(metric.result())), int(len(labels))


def _average_ranks(values):
    """1-based ranks of `values`, tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


class CandidateSetEvaluator:
    """Accumulates candidate-set predictions and computes every metric per task.

    Args:
        tasks: task names (labels and prediction keys).
        ndcg_k: the k of NDCG@k.
        length_groups: split the requests into this many groups by sequence length (the
            valid `seq_item_id` of each), at the quantiles of the evaluated requests'
            lengths, for `length_group_result()`; 0: no split.

    Example:
    >>> evaluator = CandidateSetEvaluator(["click"])
    >>> evaluator.update(features, labels, model.predict_on_batch(features), extras)
    >>> evaluator.result()["click"]["auc"]
    """

    def __init__(self, tasks, ndcg_k=10, length_groups=0):
        if isinstance(ndcg_k, bool) or not isinstance(ndcg_k, int) or ndcg_k < 1:
            raise ValueError(f"ndcg_k must be a positive integer. Received: ndcg_k={ndcg_k!r}")
        if (isinstance(length_groups, bool) or not isinstance(length_groups, int)
                or length_groups < 0):
            raise ValueError("length_groups must be a non-negative integer. Received: "
                             f"length_groups={length_groups!r}")
        self.tasks = tuple(tasks)
        self.ndcg_k = ndcg_k
        self.length_groups = length_groups
        self.reset()

    def reset(self):
        self._num_requests = 0
        self._request_ids = []
        self._sequence_lengths = []
        self._labels = {task: [] for task in self.tasks}
        self._predictions = {task: [] for task in self.tasks}
        self._truths = {task: [] for task in self.tasks}
        self._ndcg = {task: [0.0, 0] for task in self.tasks}  # sum over lists, lists

    def update(self, features, labels, predictions, extras=None):
        """Adds one batch. `features` needs `cand_item_id` [B, m]; `labels` and
        `predictions` map each task to [B, m]; `extras` may hold `truth_<task>` [B, m]."""
        candidate_ids = _numpy(features["cand_item_id"])
        mask = candidate_ids != 0
        batch_size = mask.shape[0]
        request_ids = np.broadcast_to(
            np.arange(self._num_requests, self._num_requests + batch_size)[:, None],
            mask.shape)
        self._request_ids.append(request_ids[mask])
        self._num_requests += batch_size
        if self.length_groups:
            if "seq_item_id" not in features:
                raise ValueError("length_groups needs the feature seq_item_id.")
            self._sequence_lengths.append((_numpy(features["seq_item_id"]) != 0).sum(axis=1))
        for task in self.tasks:
            task_labels = _numpy(labels[task]).astype(np.float64)
            task_predictions = _numpy(predictions[task]).astype(np.float64)
            self._labels[task].append(task_labels[mask])
            self._predictions[task].append(task_predictions[mask])
            truth = None if extras is None else extras.get(TRUTH_PREFIX + task)
            if truth is not None:
                self._truths[task].append(_numpy(truth).astype(np.float64)[mask])
            value, lists = ndcg_at_k(task_labels, task_predictions, mask, self.ndcg_k)
            if lists:
                self._ndcg[task][0] += value * lists
                self._ndcg[task][1] += lists

    @property
    def num_requests(self):
        return self._num_requests

    def result(self):
        """`{task: {"auc", "gauc", "ndcg@k", "logloss", "num_candidates", "num_positives",
        "gauc_requests"[, "truth_auc", "auc_gap_to_truth"]}}`."""
        request_ids = _concatenate(self._request_ids, np.int64)
        results = {}
        for task in self.tasks:
            labels = _concatenate(self._labels[task], np.float64)
            predictions = _concatenate(self._predictions[task], np.float64)
            gauc, gauc_requests = grouped_auc(labels, predictions, request_ids)
            ndcg_sum, ndcg_lists = self._ndcg[task]
            task_result = {
                "auc": auc(labels, predictions),
                "gauc": gauc,
                f"ndcg@{self.ndcg_k}": ndcg_sum / ndcg_lists if ndcg_lists else float("nan"),
                "logloss": log_loss(labels, predictions),
                "num_candidates": int(labels.size),
                "num_positives": int((labels > 0.5).sum()),
                "gauc_requests": gauc_requests,
            }
            if self._truths[task]:
                truth = _concatenate(self._truths[task], np.float64)
                task_result["truth_auc"] = auc(labels, truth)
                task_result["auc_gap_to_truth"] = task_result["truth_auc"] - task_result["auc"]
            results[task] = task_result
        return results


    def length_group_result(self):
        """Per length group, shortest first: `{"min_length", "max_length", "num_requests",
        "tasks": {task: {"auc", "gauc", "num_candidates"[, "truth_auc"]}}}`; [] without
        groups."""
        if not self.length_groups or not self._num_requests:
            return []
        lengths = _concatenate(self._sequence_lengths, np.int64)
        edges = np.quantile(lengths, np.arange(1, self.length_groups) / self.length_groups)
        request_group = np.searchsorted(edges, lengths, side="right")
        request_ids = _concatenate(self._request_ids, np.int64)
        candidate_group = request_group[request_ids]
        # Each task's candidates, concatenated once for all groups.
        pooled = {task: {"labels": _concatenate(self._labels[task], np.float64),
                         "predictions": _concatenate(self._predictions[task], np.float64),
                         "truths": (_concatenate(self._truths[task], np.float64)
                                    if self._truths[task] else None)} for task in self.tasks}
        groups = []
        for group in np.unique(request_group):
            in_group = candidate_group == group
            tasks = {}
            for task, arrays in pooled.items():
                labels = arrays["labels"][in_group]
                predictions = arrays["predictions"][in_group]
                tasks[task] = {"auc": auc(labels, predictions),
                               "gauc": grouped_auc(labels, predictions,
                                                   request_ids[in_group])[0],
                               "num_candidates": int(labels.size)}
                if arrays["truths"] is not None:
                    tasks[task]["truth_auc"] = auc(labels, arrays["truths"][in_group])
            members = lengths[request_group == group]
            groups.append({"min_length": int(members.min()), "max_length": int(members.max()),
                           "num_requests": int(members.size), "tasks": tasks})
        return groups


def _numpy(value):
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value)


def _concatenate(parts, dtype):
    return np.concatenate(parts).astype(dtype) if parts else np.zeros([0], dtype)
