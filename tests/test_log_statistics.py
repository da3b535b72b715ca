"""The converter's global statistics as mergeable pieces (what lets the Beam pipeline compute
them over workers): each against NumPy on the whole data, whatever the split into parts and
the order of merging."""

import numpy as np
import pytest

from ifa_tf import metrics
from ifa_tf.data import leak_audit, log_statistics


@pytest.mark.parametrize("seed", range(4))
def test_split_time_is_numpys_lower_quantile_by_radix_selection(seed):
    rng = np.random.default_rng(seed)
    for size in (1, 2, 7, 1000):
        times = rng.integers(0, [10, 2**62][seed % 2], size)  # ties, and 62-bit values
        for test_fraction in (0.0, 0.1, 0.2, 0.5, 0.99):
            expected = (int(np.quantile(times, 1.0 - test_fraction, method="lower"))
                        if test_fraction else int(times.max()) + 1)
            assert log_statistics.split_time(times, test_fraction) == expected
            rank = log_statistics.split_rank(size, test_fraction)
            if rank is not None:  # the Beam passes: histograms of parts, summed
                parts = np.array_split(rng.permutation(times), 3)
                prefix = 0
                for level in range(len(log_statistics.RADIX_LEVELS)):
                    histogram = sum(log_statistics.radix_histogram(p, level, prefix)
                                    for p in parts)
                    prefix, rank = log_statistics.radix_narrow(histogram, level, prefix, rank)
                assert prefix == expected


def test_item_counts_merge_to_numpys_unique_counts():
    rng = np.random.default_rng(0)
    items = rng.integers(1, 50, 500)
    parts = [log_statistics.ItemCounts().add(p) for p in np.array_split(items, 4)]
    merged = parts[2].merge(parts[0]).merge(parts[3]).merge(parts[1])
    expected = np.unique(items, return_counts=True)
    for got, want in zip(merged.result(), expected):
        np.testing.assert_array_equal(got, want)
    assert merged.result()[1].dtype == np.int64
    empty = log_statistics.ItemCounts().result()
    assert len(empty[0]) == 0 and len(empty[1]) == 0


def test_split_statistics_equal_numpy_on_the_same_numbers():
    rng = np.random.default_rng(1)
    seq, cand, positives = (rng.integers(0, 40, 101), rng.integers(1, 9, 101),
                            rng.integers(0, 5, 101))
    halves = [log_statistics.SplitStatistics(), log_statistics.SplitStatistics()]
    for i, row in enumerate(zip(seq, cand, positives)):
        halves[i % 2].add(*row, unlabelled=1)
    result = halves[1].merge(halves[0]).result("train-*")
    assert result == {"pattern": "train-*", "num_requests": 101,
                      "mean_seq_len": float(np.mean(seq)),
                      "median_seq_len": float(np.median(seq)),
                      "p90_seq_len": float(np.percentile(seq, 90)),
                      "max_seq_len": int(seq.max()), "mean_candidates": float(np.mean(cand)),
                      "min_candidates": int(cand.min()), "max_candidates": int(cand.max()),
                      "mean_positives": float(np.mean(positives)),
                      "window_items_unlabelled": 101}


def test_first_categories_keep_each_items_earliest_row_across_parts():
    items = np.array([5, 3, 5, 7, 3])
    categories = np.array([50, 30, 51, 70, 31])
    positions = np.array([10, 2, 1, 4, 3])
    whole = log_statistics.first_categories(items, categories, positions)
    assert whole == {5: (1, 51), 3: (2, 30), 7: (4, 70)}
    first = log_statistics.first_categories(items[:2], categories[:2], positions[:2])
    merged = log_statistics.merge_first_categories(
        first, log_statistics.first_categories(items[2:], categories[2:], positions[2:]))
    assert merged == whole


def test_pooled_auc_over_value_ranges_is_metrics_auc_bit_for_bit():
    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=3000), 2)  # many ties
    scores[:50] = 0.0
    scores[50:60] = -0.0
    labels = {"a": (rng.random(3000) < 0.3).astype(np.int64),
              "b": (rng.random(3000) < 0.05).astype(np.int64)}
    ranges = leak_audit.value_range(scores, bits=12)
    parts = {}
    for value_range in np.unique(ranges):
        mask = ranges == value_range
        halves = [leak_audit.ScoreHistogram(("a", "b")) for _ in range(2)]
        for i, half in enumerate(halves):
            rows = np.flatnonzero(mask)[i::2]
            half.add(scores[rows], {t: v[rows] for t, v in labels.items()})
        parts[int(value_range)] = halves[0].merge(halves[1]).terms()
    assert len(parts) > 10
    aucs = leak_audit.pooled_auc(parts)
    for task in ("a", "b"):
        assert aucs[task] == metrics.auc(labels[task], scores)
    # An order-preserving range key: a higher range never holds a lower value.
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(ranges[order]) >= 0)


def test_grouped_auc_sums_exactly_in_any_order():
    rng = np.random.default_rng(3)
    requests = [((rng.random(7) < 0.4).astype(int), rng.random(7)) for _ in range(40)]
    forward, backward = leak_audit.GroupedAUC(), leak_audit.GroupedAUC()
    for labels, scores in requests:
        forward.add(labels, scores)
    for labels, scores in reversed(requests):
        backward.add(labels, scores)
    groups = np.repeat(np.arange(40), 7)
    expected, _ = metrics.grouped_auc(np.concatenate([r[0] for r in requests]),
                                      np.concatenate([r[1] for r in requests]), groups)
    assert forward.result() == backward.result() == pytest.approx(expected, abs=1e-15)


def test_train_statistics_merged_from_parts_score_as_one():
    requests = [np.array([1, 2, 3]), np.array([2, 4]), np.array([1, 4, 5]), np.array([3])]
    hashes = leak_audit.sketch_hashes(0, 16, len(requests))
    whole = leak_audit.TrainStatistics(*hashes, 16)
    parts = [leak_audit.TrainStatistics(*hashes, 16) for _ in range(2)]
    for index, items in enumerate(requests):
        whole.add(items, index)
        parts[index % 2].add(items, index)
    merged = parts[1].merge(parts[0]).lookup()
    expected = whole.lookup()
    candidates = np.array([4, 1, 9, 3])
    np.testing.assert_array_equal(merged.popularity(candidates), [2, 2, 0, 2])
    np.testing.assert_array_equal(merged.profile(candidates), expected.profile(candidates))
    assert not merged.profile(candidates)[2].any()
