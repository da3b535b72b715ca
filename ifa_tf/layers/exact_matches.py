import keras
from keras import ops

from ifa_tf.layers.fast_ops import searchsorted_rows


@keras.saving.register_keras_serializable(package="ifa_tf")
class ExactMatches(keras.layers.Layer):
    """Per candidate and id attribute: how many valid sequence events share its id, and how
    long ago the most recent of them was, over the whole sequence at O((m + n) log n).

    An exact match between a candidate and an event (the same item seen again, a favourite
    author, a category) is the most informative interaction there is, and a dot product of
    hashed embeddings does not single it out. This counts them for every candidate without
    comparing candidates with events: per request and attribute, the sequence's ids are
    sorted once (O(n log n)), each candidate's run of equal ids is found by binary search
    (O(m log n)), its length is the count, and the smallest time delta within each run
    (one segment max over the n sorted events) is the most recent match. All attributes
    and requests go through one sort, one pair of searches and one segment max. Memory is
    O(A B (m + n)) for A attributes: the peak is a few [A B, n + 1] int64 tensors (the
    ids, their sort order, sorted ids and time deltas, run ids) and [A B, m] ones; no
    [m, n] tensor exists. It has no weights.

    Masking: events where `sequence_mask` is False, and their ids and time deltas, change
    nothing. A candidate whose id is 0 (padding, or an unknown attribute: 0 is never a
    real id) or where `candidate_mask` is False gets count 0 and no match. A request with
    no valid event (n = 0 included) gives counts 0.

    Call arguments:
        candidate_ids: a list of int [B, m], one per attribute (e.g. `cand_item_id`,
            `cand_author_id`, `cand_category_id`).
        sequence_ids: the list of the same attributes' int [B, n] sequence ids, in the
            same order.
        sequence_time_delta: optional int [B, n], seconds before the request (>= 0).
        sequence_mask: optional bool [B, n]; defaults to `sequence_ids[0] != 0`.
        candidate_mask: optional bool [B, m]; defaults to every candidate.

    Returns:
        `(counts, last_time_delta)`: int32 [B, m, attributes], the number of valid events
        that share the candidate's id, and int64 [B, m, attributes], the smallest
        `sequence_time_delta` among them (-1 where there is none); `last_time_delta` is
        None without `sequence_time_delta`.

    Backends: `keras.ops` throughout, except the row-wise binary search, which
    `ifa_tf.layers.fast_ops.searchsorted_rows` runs natively on TensorFlow, by `vmap` on
    JAX, and by `keras.ops.vectorized_map` elsewhere. On JAX, int64 ids need
    `JAX_ENABLE_X64=1`.

    Example (one request, one attribute; the last event is padding):
    >>> counts, last = ExactMatches()([np.array([[7, 8, 5]])], [np.array([[8, 7, 8, 0]])],
    ...                               np.array([[30, 20, 10, 0]]))
    >>> ops.convert_to_numpy(counts)[..., 0], ops.convert_to_numpy(last)[..., 0]
    (array([[1, 2, 0]], dtype=int32), array([[20, 10, -1]]))
    """

    def call(self, candidate_ids, sequence_ids, sequence_time_delta=None, sequence_mask=None,
             candidate_mask=None):
        if len(candidate_ids) != len(sequence_ids) or not candidate_ids:
            raise ValueError("`candidate_ids` and `sequence_ids` need one tensor per "
                             f"attribute, the same attributes. Received: {len(candidate_ids)} "
                             f"and {len(sequence_ids)} tensors")
        if sequence_mask is None:
            sequence_mask = ops.not_equal(sequence_ids[0], 0)
        attributes = len(candidate_ids)
        # Every attribute of every request is one row of one sort and one search: a few
        # large ops instead of a few per attribute (each op has a fixed cost on a CPU).
        candidates = ops.stack([ops.cast(ids, "int64") for ids in candidate_ids])  # [A, B, m]
        valid_candidates = ops.not_equal(candidates, 0)
        if candidate_mask is not None:
            valid_candidates = ops.logical_and(valid_candidates,
                                               ops.cast(candidate_mask, "bool")[None])
        # One padded event appended to every request keeps a candidate's run index in
        # range when n = 0; padded events take id 0, which no valid candidate has.
        sequence_mask = ops.pad(ops.cast(sequence_mask, "bool"), ((0, 0), (0, 1)),
                                constant_values=False)
        events = ops.pad(ops.stack([ops.cast(ids, "int64") for ids in sequence_ids]),
                         ((0, 0), (0, 0), (0, 1)))
        events = ops.where(sequence_mask[None], events, 0)  # [A, B, n + 1]
        length, num_candidates = ops.shape(events)[-1], ops.shape(candidates)[-1]
        events = ops.reshape(events, (-1, length))  # [A * B, n + 1]
        candidates = ops.reshape(candidates, (-1, num_candidates))
        order = ops.argsort(events, axis=-1)
        sorted_events = ops.take_along_axis(events, order, axis=-1)
        first = searchsorted_rows(sorted_events, candidates, side="left")
        end = searchsorted_rows(sorted_events, candidates, side="right")
        valid_candidates = ops.reshape(valid_candidates, (-1, num_candidates))
        count = ops.where(valid_candidates, end - first, 0)

        def by_candidate(rows):  # [A * B, m] -> [B, m, A]
            return ops.transpose(ops.reshape(rows, (attributes, -1, num_candidates)),
                                 (1, 2, 0))

        if sequence_time_delta is None:
            return by_candidate(count), None
        time_delta = ops.pad(ops.cast(sequence_time_delta, "int64"), ((0, 0), (0, 1)))
        time_delta = ops.reshape(ops.broadcast_to(time_delta[None], (attributes,
                                                                     *ops.shape(time_delta))),
                                 (-1, length))
        last = self._last_time_delta(sorted_events,
                                     ops.take_along_axis(time_delta, order, axis=-1), first,
                                     count)
        return by_candidate(count), by_candidate(last)

    @staticmethod
    def _last_time_delta(sorted_events, sorted_time_delta, first, count):
        """The smallest time delta of each candidate's run of equal ids, -1 without one;
        every argument has one row per (attribute, request)."""
        rows, length = ops.shape(sorted_events)[0], ops.shape(sorted_events)[1]
        starts = ops.concatenate([ops.ones_like(sorted_events[:, :1], "int32"), ops.cast(
            ops.not_equal(sorted_events[:, 1:], sorted_events[:, :-1]), "int32")], axis=1)
        run = ops.cumsum(starts, axis=1) - 1  # [rows, n + 1]: each event's run in its row
        # Runs numbered apart per row, so one segment reduction serves them all.
        offsets = ops.arange(rows, dtype="int32")[:, None] * length
        newest = -ops.segment_max(ops.reshape(-sorted_time_delta, (-1,)),
                                  ops.reshape(run + offsets, (-1,)),
                                  num_segments=rows * length)
        # A candidate without a match may search past the last event; its run is unused.
        candidate_run = ops.take_along_axis(run, ops.minimum(first, length - 1),
                                            axis=1) + offsets  # [rows, m]
        last = ops.take(newest, ops.reshape(candidate_run, (-1,)), axis=0)
        return ops.where(count > 0, ops.reshape(last, ops.shape(first)), -1)

    def compute_output_shape(self, candidate_ids_shape, sequence_ids_shape,
                             sequence_time_delta_shape=None, sequence_mask_shape=None,
                             candidate_mask_shape=None):
        shape = (*candidate_ids_shape[0], len(candidate_ids_shape))
        return shape, (shape if sequence_time_delta_shape is not None else None)
