"""The log converter's per-user work: one user's events -> timeline -> requests.

Plain functions over NumPy arrays. The in-process converter (`log_converter.convert_log`)
calls them on a timeline holding every user, the Beam pipeline (`beam_pipeline`) on one
user's timeline in a worker; both read the global statistics they need
(`log_statistics`: the split time, the negative sampler, the items' categories) from the
same functions, so a request comes out the same from either driver.

- `merge_and_sort`: events sorted by (user, time, log position), rows of one (user, item,
  time) merged (their action bits OR-ed).
- `request_points`: each user's events cut into request windows: a request at time T (its
  window's first event) has the events strictly before T as its history.
- `window_positives`: a window's distinct items, the first `max_positives` labelled.
- `build_request`: one request's features and labels (sequence, candidates with sampled
  negatives, cross features), seeded by (seed, user, time) alone, so it does not depend on
  which worker builds it or in which order.
- `sequence_events`: a user's whole timeline as the events a stateful model's state is
  built from (`ifa-state build --log`, in-process and on Beam).
"""

import dataclasses

import numpy as np

from ifa_tf.data import records

_INT64_MAX = 2**63 - 1


@dataclasses.dataclass
class Timeline:
    """Events sorted by (user, time, log position), rows with one (user, item, time)
    merged."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    bits: np.ndarray
    user_start: np.ndarray  # index of each user's first event, plus the end


def merge_and_sort(user, item, time, bits, position):
    """The `Timeline` of events given as parallel arrays; `position` is each row's place in
    the log (its line, or file and line), which orders ties."""
    order = np.lexsort((position, item, time, user))
    user, item, time, bits = user[order], item[order], time[order], bits[order]
    same = np.zeros(len(user), bool)
    same[1:] = (user[1:] == user[:-1]) & (item[1:] == item[:-1]) & (time[1:] == time[:-1])
    group = np.cumsum(~same) - 1
    merged_bits = np.zeros(group[-1] + 1, np.int64)
    np.bitwise_or.at(merged_bits, group, bits)
    keep = ~same
    user, item, time = user[keep], item[keep], time[keep]
    # Re-sort within a timestamp by first position, so ties keep the log's order.
    first_position = position[order][keep]
    order = np.lexsort((first_position, time, user))
    user, item, time, merged_bits = user[order], item[order], time[order], merged_bits[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    return Timeline(user, item, time, merged_bits, np.r_[starts, len(user)])


@dataclasses.dataclass
class RequestPoint:
    user: int
    time: int
    history: slice  # events strictly before `time`
    window: slice  # events in [time, time + window_seconds)


def request_points(timeline, config):
    """Yields the `RequestPoint`s of every user of `timeline`, by user then time: one per
    window of `config.window_seconds`, those with at least `config.min_seq_len` earlier
    events."""
    for begin, end in zip(timeline.user_start[:-1], timeline.user_start[1:]):
        times = timeline.time[begin:end]
        start = 0
        while start < len(times):
            request_time = times[start]
            # In Python integers: in int64 a window reaching past 2^63 - 1 would wrap below
            # its start, and the loop would never advance.
            window_end = int(request_time) + config.window_seconds
            stop = (len(times) if window_end > _INT64_MAX
                    else int(np.searchsorted(times, window_end, "left")))
            earlier = int(np.searchsorted(times, request_time, "left"))
            if earlier >= config.min_seq_len:
                yield RequestPoint(int(timeline.user[begin]), int(request_time),
                                   slice(begin, begin + earlier),
                                   slice(begin + start, begin + stop))
            start = stop


def window_positives(point, timeline, limit):
    """The window's distinct items (first `limit`, in log order), their action bits OR-ed
    over the window, and how many items were left unlabelled past `limit`."""
    items, first, inverse = np.unique(timeline.item[point.window], return_index=True,
                                      return_inverse=True)
    bits = np.zeros(len(items), np.int64)
    np.bitwise_or.at(bits, inverse, timeline.bits[point.window])
    in_log_order = np.argsort(first)
    return (items[in_log_order[:limit]], bits[in_log_order[:limit]],
            max(0, len(items) - limit))


def build_request(point, window, timeline, item_category, sampler, schema, rules, config):
    """One request (a dict of arrays, `records.encode_example`'s input): the sequence before
    `point`, the `window`'s positives (`window_positives`) and negatives drawn by `sampler`
    (`log_statistics.make_sampler`) shuffled together, cross features and labels."""
    rng = np.random.default_rng(np.random.SeedSequence(
        config.seed, spawn_key=(point.user, point.time)))
    history = slice(max(point.history.start, point.history.stop - config.max_seq_len),
                    point.history.stop)
    seq_item = timeline.item[history]
    positives, positive_bits, _ = window
    room = config.max_candidates - len(positives)
    if not config.fixed_set_size:
        room = min(config.num_negatives, room)
    exclude = positives
    if config.exclude_history:
        exclude = np.union1d(positives, timeline.item[point.history])
    negatives = (sampler.draw(rng, room, exclude, point, positives) if room > 0
                 else np.zeros(0, np.int64))
    candidates = np.concatenate([positives, negatives])
    bits = np.concatenate([positive_bits, np.zeros(len(negatives), np.int64)])
    impression = np.r_[np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)]
    order = rng.permutation(len(candidates))
    candidates, bits, impression = candidates[order], bits[order], impression[order]
    request = {"user_id": np.int64(point.user),
               "seq_item_id": seq_item,
               "seq_action": timeline.bits[history],
               "seq_time_delta": point.time - timeline.time[history],
               "cand_item_id": candidates,
               "impression": impression}
    if "category_id" in schema.item_attributes:
        for side, items in (("seq", seq_item), ("cand", candidates)):
            request[f"{side}_category_id"] = np.fromiter(
                (item_category[i] for i in items.tolist()), np.int64, len(items))
    request.update(records.cross_counts(request, schema))
    for task in schema.action_tasks:
        request[task] = ((bits & rules.bits[task]) > 0).astype(np.int64)
    return request


def sequence_events(timeline, events, item_category, schema, time_key):
    """A stateful model's input events from the `events` slice of `timeline` (one user's,
    whole: a state has no `max_seq_len`): `seq_item_id`, with the schema's
    `seq_category_id` (from `item_category`) and `seq_action`, and the events' times under
    `time_key`."""
    columns = {"seq_item_id": timeline.item[events]}
    if "category_id" in schema.item_attributes:
        columns["seq_category_id"] = np.fromiter(
            (item_category[i] for i in columns["seq_item_id"].tolist()), np.int64,
            len(columns["seq_item_id"]))
    if "seq_action" in schema.sequence_context:
        columns["seq_action"] = timeline.bits[events]
    columns[time_key] = timeline.time[events]
    return columns
