"""The log converter's global statistics: what building one request reads from the whole log.

Each statistic is an accumulator with `add` (a part of the log: one user, one file, or the
whole log at once), `merge` (two partial results) and a result, or a plain function of
such results. The in-process converter (`log_converter.convert_log`) fills one accumulator
over the whole log; the Beam pipeline (`beam_pipeline`) fills one per bundle and merges
them in a combiner. Both then hand the results to the same functions, so every request and
every figure of `metadata.json` comes out the same.

- `ItemCounts`: how often each item occurs (train-period popularity, how often an item is
  a positive of a train request, the set of all items).
- `split_rank`, `RankSelection`: the split time, the `1 - test_fraction` quantile of
  request times (NumPy's "lower" rule), found exactly by radix selection: four passes of
  a 65,536-bucket histogram, so no worker holds every request time.
- `make_sampler` and its samplers: negatives by popularity strata, by exposure, or by
  popularity (built from `ItemCounts` results).
- `SplitStatistics`: the sequence lengths, set sizes and positives of a split.
- `first_categories`: each item's first category in the log.
- `shared_ids`, `report_collisions`, `vocabulary_lines`: the id tables.
"""

import collections
import logging

import numpy as np

_MAX_SHOWN_COLLISIONS = 5
_VOCAB_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
# Radix selection over int64 values >= 0: (shift, bits) of each pass, most significant
# first; bit 63 is always 0.
RADIX_LEVELS = ((47, 16), (31, 16), (15, 16), (0, 15))
_COMPACT_AT = 1 << 20  # ItemCounts: pending entries before they are summed
_logger = logging.getLogger("ifa_tf.data.log_converter")


# ------------------------------------------------------------------------------- counts
class ItemCounts:
    """How often each item occurs: `add` arrays of item ids (repeats counted), `merge`
    another `ItemCounts`, `result()` the sorted distinct items and their int64 counts
    (what `np.unique(all_items, return_counts=True)` gives)."""

    def __init__(self):
        self._items, self._counts, self._pending = [], [], 0
        self._compacted, self._size = False, 0  # distinct items after the last compaction

    def add(self, items, counts=None):
        items = np.asarray(items, np.int64)
        if counts is None:
            items, counts = np.unique(items, return_counts=True)
        self._items.append(items)
        self._counts.append(np.asarray(counts, np.int64))
        self._pending += len(items)
        self._compacted = False
        if self._pending > max(_COMPACT_AT, self._size):  # amortised: linear in all
            self._compact()
        return self

    def merge(self, other):
        for items, counts in zip(other._items, other._counts):
            self.add(items, counts)
        return self

    def __len__(self):
        return len(self.result()[0])

    def result(self):
        self._compact()
        return self._items[0], self._counts[0]

    def _compact(self):
        if self._compacted:
            return
        self._compacted = True
        if not self._items:
            self._items, self._counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            return
        items, inverse = np.unique(np.concatenate(self._items), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(self._counts),
                             minlength=len(items))
        self._items, self._counts = [items], [np.rint(counts).astype(np.int64)]
        self._pending, self._size = 0, len(items)


# ---------------------------------------------------------------------------- split time
def split_rank(num_requests, test_fraction):
    """The index, in the sorted request times, of the split time: NumPy's
    `quantile(times, 1 - test_fraction, method="lower")`; None when `test_fraction` is 0
    (every request goes to train)."""
    if test_fraction == 0:
        return None
    return int(np.floor((num_requests - 1) * np.float64(1.0 - test_fraction)))


def radix_histogram(values, level, prefix):
    """Pass `level` of radix selection: the histogram of the `RADIX_LEVELS[level]` digit of
    the `values` (int64 >= 0) whose higher bits are `prefix`."""
    shift, bits = RADIX_LEVELS[level]
    values = np.asarray(values, np.int64)
    values = values[(values >> (shift + bits)) == prefix]
    return np.bincount((values >> shift) & ((1 << bits) - 1), minlength=1 << bits)


def radix_narrow(histogram, level, prefix, rank):
    """The `(prefix, rank)` of the next pass: the digit whose bucket holds the value of
    `rank` (0-based, among the values under `prefix`), and its rank within that bucket.
    After the last level, `prefix` is the value."""
    _, bits = RADIX_LEVELS[level]
    cumulative = np.cumsum(histogram)
    digit = int(np.searchsorted(cumulative, rank, "right"))
    below = int(cumulative[digit - 1]) if digit else 0
    return (prefix << bits) | digit, rank - below


def select_rank(values, rank):
    """The value of 0-based `rank` among `values` (int64 >= 0), by the same passes the Beam
    pipeline makes over its workers' partial histograms."""
    prefix = 0
    for level in range(len(RADIX_LEVELS)):
        prefix, rank = radix_narrow(radix_histogram(values, level, prefix), level, prefix,
                                    rank)
    return prefix


def split_time(times, test_fraction):
    """Requests at or after this time go to test: the `1 - test_fraction` quantile
    (`split_rank`) of the request times, or after the last one when `test_fraction` is 0."""
    rank = split_rank(len(times), test_fraction)
    if rank is None:
        return int(np.max(times)) + 1
    return select_rank(times, rank)


def warn_if_no_train(num_requests, any_train, test_fraction, time):
    if not any_train:
        _logger.warning("All %d requests go to test and no train split is written: the "
                        "split time, the %g quantile of request times, is the earliest "
                        "(%d). Set test_fraction=0 to write them all to train.",
                        num_requests, 1.0 - test_fraction, time)


# -------------------------------------------------------------------------- categories
def first_categories(items, categories, positions):
    """`{item: (position, category)}` of each item's first row (smallest `position`) among
    parallel arrays; partial results merge with `merge_first_categories`."""
    items = np.asarray(items, np.int64)
    order = np.argsort(positions, kind="stable")
    found, first = np.unique(items[order], return_index=True)
    rows = order[first]
    return dict(zip(found.tolist(), zip(np.asarray(positions)[rows].tolist(),
                                        np.asarray(categories)[rows].tolist())))


def merge_first_categories(first, other):
    """`first` updated with `other`: per item the row of the smaller position."""
    for item, row in other.items():
        if item not in first or row[0] < first[item][0]:
            first[item] = row
    return first


# ---------------------------------------------------------------------------- samplers
class PopularitySampler:
    """Distinct items by train-period popularity."""

    def __init__(self, items, counts):
        self.items = items  # sorted, so the draws do not depend on the log's order
        self.counts = counts
        cdf = np.cumsum(counts.astype(np.float64))
        self.cdf = cdf / cdf[-1]
        self.fallbacks = 0

    def sample(self, rng, count, exclude):
        """Up to `count` distinct items by popularity, none in `exclude`."""
        chosen = np.zeros(0, np.int64)
        for _ in range(8):
            if len(chosen) >= count:
                break
            draw = self.items[np.minimum(np.searchsorted(self.cdf, rng.random(2 * count + 8)),
                                         len(self.items) - 1)]
            draw = draw[~np.isin(draw, exclude) & ~np.isin(draw, chosen)]
            _, first = np.unique(draw, return_index=True)
            chosen = np.concatenate([chosen, draw[np.sort(first)]])
        return chosen[:count]

    def draw(self, rng, count, exclude, point, positives):
        del point, positives  # popularity alone
        return self.sample(rng, count, exclude)


class MatchedPopularitySampler:
    """Negatives matched to the request's positives in popularity: for each negative a
    random positive's stratum (half powers of two of the item's count as a positive of
    training requests; items never one form stratum 0), and in it an item drawn in
    proportion to its count plus one, none excluded. A stratum that runs out lends to its
    neighbours; `popularity` tops up a draw that cannot be filled."""

    def __init__(self, all_items, labelled, popularity):
        self.popularity = popularity
        where = np.minimum(np.searchsorted(labelled.items, all_items),
                           len(labelled.items) - 1)
        counts = np.where(labelled.items[where] == all_items, labelled.counts[where], 0)
        self.items, self.counts = all_items, counts
        self.stratum_of = stratum(counts)
        self.members = {int(s): np.flatnonzero(self.stratum_of == s)
                        for s in np.unique(self.stratum_of)}
        self.fallbacks = 0

    def draw(self, rng, count, exclude, point, positives):
        del point
        where = np.searchsorted(self.items, positives)
        wanted = self.stratum_of[where][rng.integers(0, len(positives), count)]
        available = ~np.isin(self.items, exclude)
        chosen = []
        for wanted_stratum in np.unique(wanted).tolist():
            need = int(np.sum(wanted == wanted_stratum))
            for distance in range(0, int(self.stratum_of.max()) + 1):
                pool = np.sort(np.concatenate([
                    members[available[members]] for members in (
                        self.members.get(s) for s in {wanted_stratum - distance,
                                                      wanted_stratum + distance})
                    if members is not None] or [np.zeros(0, np.int64)]))
                if not len(pool):
                    continue
                take = min(need, len(pool))
                weights = self.counts[pool] + 1.0
                picked = rng.choice(pool, take, replace=False, p=weights / weights.sum())
                available[picked] = False
                chosen.extend(self.items[picked].tolist())
                need -= take
                if not need:
                    break
        return _top_up(self, rng, np.array(chosen, np.int64), count, exclude)


def stratum(counts):
    """Popularity strata: half powers of two of a count."""
    return np.floor(2.0 * np.log2(np.asarray(counts, np.float64) + 1.0)).astype(np.int64)


class ExposureSampler:
    """Negatives from other users' request windows nearest in time: the labelled window
    items of those requests (capped like positives), whole windows in random order, the
    last one cut to fit. The neighbourhood starts at `width` requests on each side and
    widens fourfold until the draw is filled.

    Args:
        times, users: every request's time and user, in the order of `request_points`
            (by user, then time).
        windows: every request's labelled window items, in that order.
        popularity: the `PopularitySampler` that tops up a draw.
    """

    def __init__(self, times, users, windows, popularity, width=32):
        times = np.asarray(times, np.int64)
        order = np.argsort(times, kind="stable")
        self.times = times[order]
        self.users = np.asarray(users, np.int64)[order]
        self.windows = [windows[i] for i in order]
        self.popularity, self.width = popularity, width
        self.fallbacks = 0

    def draw(self, rng, count, exclude, point, positives):
        del positives
        taken = set(exclude.tolist())
        chosen = []
        center = int(np.searchsorted(self.times, point.time))
        low = high = center
        width = self.width
        while len(chosen) < count and (low > 0 or high < len(self.times)):
            new_low, new_high = max(0, center - width), min(len(self.times), center + width)
            donors = np.r_[np.arange(new_low, low), np.arange(high, new_high)]
            low, high, width = new_low, new_high, width * 4
            for donor in rng.permutation(donors).tolist():
                if self.users[donor] == point.user:
                    continue
                for item in rng.permutation(self.windows[donor]).tolist():
                    if item not in taken:
                        taken.add(item)
                        chosen.append(item)
                if len(chosen) >= count:
                    break
        return _top_up(self, rng, np.array(chosen[:count], np.int64), count, exclude)


def _top_up(sampler, rng, chosen, count, exclude):
    """`chosen` filled to `count` by popularity where the sampler ran short (counted)."""
    if len(chosen) >= count:
        return chosen[:count]
    sampler.fallbacks += 1
    rest = sampler.popularity.sample(rng, count - len(chosen), np.r_[exclude, chosen])
    return np.concatenate([chosen, rest])


def make_sampler(config, popularity, all_items, positive_counts=None, exposure=None):
    """The negative sampler `config.negatives` names.

    Args:
        popularity: `(items, counts)` of the events before the split time (every event's
            when none is).
        all_items: the sorted distinct items of the log.
        positive_counts: for `popularity_matched`: `(items, counts)` of the window
            positives of the train requests; None when there is no train request.
        exposure: for `exposure`: `(times, users, windows)` of every request
            (`ExposureSampler`).
    """
    popularity = PopularitySampler(*popularity)
    if config.negatives == "popularity":
        return popularity
    if config.negatives == "popularity_matched":
        # Popularity as the labels know it: how often an item is a positive of a training
        # request (busy windows are capped, so raw event counts rank items differently).
        labelled = (popularity if positive_counts is None
                    else PopularitySampler(*positive_counts))
        return MatchedPopularitySampler(all_items, labelled, popularity)
    return ExposureSampler(*exposure, popularity)


# ------------------------------------------------------------------------- split figures
class SplitStatistics:
    """A split's requests in figures: `add` each request's sequence length, set size,
    positives and unlabelled window items; `merge`; `result()` the split's entry of
    `metadata.json` (means, median and 90th percentile as NumPy computes them from the
    same numbers, in any order)."""

    def __init__(self):
        self.seq_lens = collections.Counter()
        self.cand_lens = collections.Counter()
        self.positives = collections.Counter()
        self.unlabelled = 0

    def add(self, seq_len, num_candidates, positives, unlabelled):
        self.seq_lens[int(seq_len)] += 1
        self.cand_lens[int(num_candidates)] += 1
        self.positives[int(positives)] += 1
        self.unlabelled += int(unlabelled)
        return self

    def merge(self, other):
        self.seq_lens.update(other.seq_lens)
        self.cand_lens.update(other.cand_lens)
        self.positives.update(other.positives)
        self.unlabelled += other.unlabelled
        return self

    @property
    def num_requests(self):
        return sum(self.seq_lens.values())

    def result(self, pattern):
        seq_lens, cand_lens, positives = (_expanded(c) for c in (
            self.seq_lens, self.cand_lens, self.positives))
        return {"pattern": pattern,
                "num_requests": len(seq_lens),
                "mean_seq_len": float(np.mean(seq_lens)),
                "median_seq_len": float(np.median(seq_lens)),
                "p90_seq_len": float(np.percentile(seq_lens, 90)),
                "max_seq_len": int(np.max(seq_lens)),
                "mean_candidates": float(np.mean(cand_lens)),
                "min_candidates": int(np.min(cand_lens)),
                "max_candidates": int(np.max(cand_lens)),
                "mean_positives": float(np.mean(positives)),
                "window_items_unlabelled": self.unlabelled}


def _expanded(counter):
    """The sorted values a Counter counts, each repeated its count (int64)."""
    values = np.array(sorted(counter), np.int64)
    return np.repeat(values, [counter[v] for v in values.tolist()])


# ---------------------------------------------------------------------------- id tables
def shared_ids(table):
    """The groups (sorted lists) of distinct values of `table` ({value: id}) that share
    an id."""
    by_id = {}
    for value, id_ in table.items():
        by_id.setdefault(id_, []).append(value)
    return [sorted(values) for values in by_id.values() if len(values) > 1]


def report_collisions(role, shared):
    """The number of id collisions of `role` (`shared`: groups of values sharing an id, as
    `shared_ids` gives them), logged with examples."""
    shared = sorted(sorted(values) for values in shared)
    count = sum(len(values) - 1 for values in shared)
    if count:
        shown = "; ".join(" = ".join(repr(v) for v in values)
                          for values in shared[:_MAX_SHOWN_COLLISIONS])
        _logger.warning("%d %s id collisions: distinct %s ids share one int64 (%s%s)", count,
                        role, role, shown, "; ..." if len(shared) > _MAX_SHOWN_COLLISIONS
                        else "")
    return count


def vocabulary_lines(entries):
    """The lines of `vocab_<role>.tsv` from `(id, value)` pairs: `<id>\\t<value>` per
    distinct value, by id then value; the value's backslashes, tabs and line breaks escaped
    as `\\\\`, `\\t`, `\\n`, `\\r`."""
    return (f"{id_}\t{value.translate(_VOCAB_ESCAPES)}\n" for id_, value in sorted(entries))
