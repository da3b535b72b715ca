"""Top-k selection and gathering shared by the search units (SIM, TWIN, recent-k DIN)."""

from keras import ops

_NEGATIVE = -1e9


def select_top_k(scores, mask, k):
    """The k best valid positions along the last axis.

    Args:
        scores: float [..., n].
        mask: bool [..., n] (broadcastable), True where a position may be chosen.
        k: positions to keep. When fewer than k are valid (or n < k) the remaining slots
            are marked invalid, so any n >= 0 works.

    Returns:
        `(indices, selected_mask, selected_scores)`, each [..., k], best first.
    """
    scores = ops.where(mask, ops.cast(scores, "float32"), _NEGATIVE)
    # k sentinel slots at the end make top_k valid for n < k (n = 0 included); the
    # sentinels score lower than any masked position and are never selected as valid.
    pad = ops.full((*ops.shape(scores)[:-1], k), 2.0 * _NEGATIVE, dtype="float32")
    padded = ops.concatenate([scores, pad], axis=-1)
    selected_scores, indices = ops.top_k(padded, k, sorted=True)
    selected_mask = selected_scores > 0.5 * _NEGATIVE
    # Invalid slots point at position 0 so that gathers stay in range even when n = 0.
    indices = ops.where(selected_mask, indices, 0)
    return indices, selected_mask, selected_scores


def gather_positions(sequence, indices):
    """`sequence[b, indices[b, ...], :]`: [B, n, d] with int [B, ..., k] -> [B, ..., k, d].

    When n = 0 every index must be a masked slot (see `select_top_k`); the result is then
    zeros.
    """
    batch, length, depth = ops.shape(sequence)[0], ops.shape(sequence)[1], ops.shape(sequence)[2]
    # One zero row appended per request keeps index 0 valid when n = 0.
    padded = ops.concatenate([sequence, ops.zeros((batch, 1, depth), sequence.dtype)], axis=1)
    flat = ops.reshape(padded, (-1, depth))
    offsets = ops.reshape(ops.arange(batch, dtype="int32") * (length + 1),
                          (-1,) + (1,) * (len(indices.shape) - 1))
    flat_indices = ops.cast(indices, "int32") + offsets
    gathered = ops.take(flat, ops.reshape(flat_indices, (-1,)), axis=0)
    return ops.reshape(gathered, (*ops.shape(indices), depth))


def most_recent_positions(sequence_mask, k):
    """Indices of the k most recent valid positions of an oldest-first sequence.

    Returns `(indices, selected_mask)`, each [B, k], most recent first.
    """
    positions = ops.cast(ops.arange(ops.shape(sequence_mask)[1]), "float32")
    scores = ops.broadcast_to(positions[None, :], ops.shape(sequence_mask))
    indices, selected_mask, _ = select_top_k(scores, sequence_mask, k)
    return indices, selected_mask


def most_recent_mask(sequence_mask, k):
    """bool [B, n]: `sequence_mask` kept at its k most recent valid positions only (of an
    oldest-first sequence, padding anywhere)."""
    valid = ops.cast(sequence_mask, "int32")
    from_end = ops.flip(ops.cumsum(ops.flip(valid, axis=1), axis=1), axis=1)
    return ops.logical_and(sequence_mask, from_end <= k)
