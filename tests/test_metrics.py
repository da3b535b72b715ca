"""`ifa_tf.metrics` against independent NumPy computations written here: AUC by counting
pairs (ties one half), GAUC by looping requests, NDCG from its definition; padding never
enters a metric."""

import numpy as np
import pytest

from ifa_tf import metrics


def pairwise_auc(labels, scores):
    """O(P N) reference: P(score_pos > score_neg) + 0.5 P(equal)."""
    positives = scores[labels > 0.5]
    negatives = scores[labels <= 0.5]
    greater = (positives[:, None] > negatives[None, :]).sum()
    equal = (positives[:, None] == negatives[None, :]).sum()
    return (greater + 0.5 * equal) / (len(positives) * len(negatives))


def reference_ndcg(labels, scores, k):
    order = np.argsort(-scores, kind="stable")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = (2.0 ** labels[order] - 1.0)[:k]
    ideal = (2.0 ** np.sort(labels)[::-1] - 1.0)[:k]
    return (gains * discounts[:len(gains)]).sum() / (ideal * discounts[:len(ideal)]).sum()


def make_predictions(seed=0, batch=7, m=9, ties=True):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 6, 4, 9, 2, 5, 8])[:batch]
    mask = np.arange(m)[None, :] < lengths[:, None]
    ids = np.where(mask, rng.integers(1, 100, (batch, m)), 0)
    labels = (rng.random((batch, m)) < 0.35).astype(np.float32)
    labels[1, :6] = 0.0  # a request with only negatives
    labels[4, :2] = 1.0  # a request with only positives
    scores = rng.random((batch, m)).astype(np.float32)
    if ties:
        scores = np.round(scores * 4) / 4  # many ties, within and across classes
    labels[~mask] = 0.0
    return ids, mask, labels, scores


def test_auc_with_ties_matches_pair_counting():
    _, mask, labels, scores = make_predictions()
    y, s = labels[mask], scores[mask]
    assert len(np.unique(s)) < len(s)
    np.testing.assert_allclose(metrics.auc(y, s), pairwise_auc(y, s), rtol=0, atol=1e-12)


def test_auc_of_constant_scores_is_one_half_and_one_class_is_nan():
    assert metrics.auc([1, 0, 1, 0, 0], [0.3] * 5) == 0.5
    assert np.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_gauc_is_candidate_weighted_and_skips_one_class_requests():
    _, mask, labels, scores = make_predictions()
    groups = np.broadcast_to(np.arange(len(mask))[:, None], mask.shape)
    gauc, used = metrics.grouped_auc(labels[mask], scores[mask], groups[mask])
    total = weight = 0.0
    expected_used = 0
    for row in range(len(mask)):
        y, s = labels[row][mask[row]], scores[row][mask[row]]
        if y.min() == y.max():
            continue
        total += pairwise_auc(y, s) * len(y)
        weight += len(y)
        expected_used += 1
    assert used == expected_used <= len(mask) - 2  # rows 1 and 4 (at least) are one-class
    np.testing.assert_allclose(gauc, total / weight, atol=1e-12)


def test_ndcg_matches_definition_over_valid_candidates():
    _, mask, labels, scores = make_predictions(ties=False)
    k = 3
    value, used = metrics.ndcg_at_k(labels, scores, mask, k)
    expected = [reference_ndcg(labels[r][mask[r]], scores[r][mask[r]], k)
                for r in range(len(mask)) if labels[r][mask[r]].sum() > 0]
    assert used == len(expected)
    np.testing.assert_allclose(value, np.mean(expected), atol=1e-6)


def test_log_loss_matches_definition():
    _, mask, labels, scores = make_predictions()
    p = np.clip(scores[mask].astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels[mask]
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(metrics.log_loss(y, scores[mask]), expected, rtol=1e-12)


def test_evaluator_over_batches_equals_pooled_reference_and_ignores_padding():
    ids, mask, labels, scores = make_predictions(ties=False)  # NDCG order has no ties
    truth = np.where(mask, labels * 0.6 + 0.2 * scores, 0.0).astype(np.float32)
    # Padded positions hold adversarial values: if they leaked, every metric would change.
    poisoned_scores = np.where(mask, scores, 1.0)
    poisoned_labels = np.where(mask, labels, 1.0)
    evaluator = metrics.CandidateSetEvaluator(["click"], ndcg_k=3)
    for rows in (slice(0, 3), slice(3, 7)):  # two batches
        evaluator.update({"cand_item_id": ids[rows]}, {"click": poisoned_labels[rows]},
                         {"click": poisoned_scores[rows]}, {"truth_click": truth[rows]})
    result = evaluator.result()["click"]
    y, s = labels[mask], scores[mask]
    np.testing.assert_allclose(result["auc"], pairwise_auc(y, s), atol=1e-12)
    np.testing.assert_allclose(result["truth_auc"], pairwise_auc(y, truth[mask]), atol=1e-12)
    np.testing.assert_allclose(result["auc_gap_to_truth"],
                               result["truth_auc"] - result["auc"], atol=1e-12)
    groups = np.broadcast_to(np.arange(len(mask))[:, None], mask.shape)[mask]
    np.testing.assert_allclose(result["gauc"], metrics.grouped_auc(y, s, groups)[0])
    assert result["num_candidates"] == mask.sum()
    assert result["num_positives"] == y.sum()
    np.testing.assert_allclose(result["logloss"], metrics.log_loss(y, s))
    # NDCG per batch is weighted by lists, so it equals the pooled mean over lists.
    value, _ = metrics.ndcg_at_k(labels, np.where(mask, scores, 0), mask, 3)
    np.testing.assert_allclose(result["ndcg@3"], value, atol=1e-6)


def test_evaluator_rejects_bad_k():
    with pytest.raises(ValueError, match="ndcg_k"):
        metrics.CandidateSetEvaluator(["click"], ndcg_k=0)


def test_length_groups_split_requests_by_sequence_length_into_equal_groups():
    rng = np.random.default_rng(3)
    batch, m, n = 12, 6, 10
    sequence_lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 3])
    sequence = np.where(np.arange(n)[None] < sequence_lengths[:, None],
                        rng.integers(1, 50, (batch, n)), 0)
    ids = rng.integers(1, 50, (batch, m))
    ids[0, 4:] = 0  # padded candidates never count
    labels = (rng.random((batch, m)) < 0.4).astype(np.float32)
    scores = rng.random((batch, m))
    truth = rng.random((batch, m))
    evaluator = metrics.CandidateSetEvaluator(["click"], length_groups=3)
    for rows in (slice(0, 5), slice(5, 12)):  # two batches
        evaluator.update({"cand_item_id": ids[rows], "seq_item_id": sequence[rows]},
                         {"click": labels[rows]}, {"click": scores[rows]},
                         {"truth_click": truth[rows]})
    groups = evaluator.length_group_result()
    # The tertiles of the 12 sorted lengths 1 2 3 3 | 4 5 6 7 | 8 9 10 10 fall between 3 and
    # 4 and between 7 and 8: four requests a group.
    expected_members = [sequence_lengths <= 3, (sequence_lengths >= 4) & (sequence_lengths <= 7),
                        sequence_lengths >= 8]
    assert [g["num_requests"] for g in groups] == [int(e.sum()) for e in expected_members]
    for group, members in zip(groups, expected_members):
        assert (group["min_length"], group["max_length"]) == (
            sequence_lengths[members].min(), sequence_lengths[members].max())
        valid = (ids != 0) & members[:, None]
        click = group["tasks"]["click"]
        assert click["num_candidates"] == valid.sum()
        assert click["auc"] == pytest.approx(pairwise_auc(labels[valid], scores[valid]))
        assert click["truth_auc"] == pytest.approx(pairwise_auc(labels[valid], truth[valid]))
    assert metrics.CandidateSetEvaluator(["click"]).length_group_result() == []
    with pytest.raises(ValueError, match="length_groups=-1"):
        metrics.CandidateSetEvaluator(["click"], length_groups=-1)
    with pytest.raises(ValueError, match="seq_item_id"):
        metrics.CandidateSetEvaluator(["click"], length_groups=2).update(
            {"cand_item_id": ids}, {"click": labels}, {"click": scores})
