"""Diagnostics of what a trained model does, beside its metrics.

`attention_concentration` measures how concentrated attention weights are, per query: top-k
retrieval (SIM, TWIN) puts all weight on k events, while linear attention with a smooth
feature map may spread it over hundreds. Feed it the weights of
`NormalizedLinearAttention.attention_weights` (or any [..., n] attention weights, e.g. a
softmax's) on a small request. `weight_on_matches` measures whether that weight lands on
the events that share the candidate's id (its own past events). `learned_sharpness` reads
the per-head temperatures and focusing powers a model with learnable sharpness has learned.
`non_finite_weights` finds the weights a diverged training run left NaN or infinite. NumPy
only (a model's variables are read as arrays).
"""

import math
import numbers

import numpy as np


def attention_concentration(weights, key_mask=None, top_fraction=0.01):
    """Entropy and top-share of each query's attention weights over its valid events.

    Each row is first normalised to sum to 1 over its valid events (the layer's epsilon
    leaves its rows summing to slightly less).

    Args:
        weights: [..., n] non-negative weights of each query over n events, e.g.
            [B, heads, m, n] from `NormalizedLinearAttention.attention_weights`.
        key_mask: bool, True at valid events: [B, n] (as the layers take it; axes are
            inserted after the batch axis to match `weights`) or any shape that
            broadcasts against `weights`. `None`: every event is valid.
        top_fraction: the share of a row's valid events that count as its top: the
            ceil(top_fraction * n_valid) largest weights, at least one event.

    Returns:
        A dict of float64 arrays of shape `weights.shape[:-1]`:
        - `"entropy"`: -sum p log p in nats; 0 when one event takes all the weight,
          log(n_valid) when the weight is uniform.
        - `"top_share"`: the share of the weight on the row's top events.
        - `"num_events"`: n_valid.
        Entropy and top share are NaN in a row with no valid event or no weight (a padded
        query).
    """
    if not (isinstance(top_fraction, numbers.Real) and 0 < top_fraction <= 1):
        raise ValueError("`top_fraction` must be in (0, 1]. Received: "
                         f"top_fraction={top_fraction!r}")
    weights = np.asarray(weights, dtype=np.float64)
    if (weights < 0).any():
        raise ValueError("`weights` must be non-negative. Received: a weight of "
                         f"{weights.min()}")
    if key_mask is None:
        key_mask = np.ones(weights.shape[-1:], bool)
    key_mask = np.asarray(key_mask, bool)
    if 1 < key_mask.ndim < weights.ndim:
        key_mask = key_mask.reshape(key_mask.shape[:1] + (1,) * (weights.ndim - key_mask.ndim)
                                    + key_mask.shape[1:])
    key_mask = np.broadcast_to(key_mask, weights.shape)
    weights = np.where(key_mask, weights, 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    num_events = key_mask.sum(axis=-1)
    defined = (total[..., 0] > 0) & (num_events > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = weights / total
        entropy = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=-1)
    # Padded events sort last (their -1 is below every valid share) and are never summed:
    # at most n_valid events are. The leading 0 is the sum of none (a row with no event).
    descending = -np.sort(-np.where(key_mask, shares, -1.0), axis=-1)
    cumulative = np.cumsum(np.concatenate([np.zeros_like(descending[..., :1]), descending],
                                          axis=-1), axis=-1)
    # Rounded first: 0.01 * 300 is 3.0000000000000004 in floating point, not 3.
    num_top = np.minimum(np.maximum(np.ceil(np.round(top_fraction * num_events, 9)), 1),
                         num_events)
    top_share = np.take_along_axis(cumulative, num_top.astype(int)[..., None], axis=-1)[..., 0]
    return {
        "entropy": np.where(defined, entropy, math.nan),
        "top_share": np.where(defined, top_share, math.nan),
        "num_events": num_events.astype(np.float64),
    }


def weight_on_matches(weights, query_ids, key_ids, key_mask=None):
    """How much attention each query puts on the events that share its id, against their
    share of the events: does attention find a candidate's own past events?

    With lifelong sequences a model gains over a pooled vector by reading the few events
    that match a candidate (a re-engaged item, a favourite author). Uniform attention puts
    on them exactly their share of the events (lift 1); retrieval of the matches puts all
    its weight there (lift n_valid / n_matches).

    Args:
        weights: [B, heads, m, n] non-negative weights (e.g.
            `NormalizedLinearAttention.attention_weights`, or a softmax's weights with the
            head axis moved to 1).
        query_ids: [B, m] the id of each query (e.g. `cand_item_id`).
        key_ids: [B, n] the id of each event (e.g. `seq_item_id`).
        key_mask: bool [B, n], True at valid events; `None`: `key_ids != 0`.

    Returns:
        A dict of float64 arrays [B, heads, m]: `"weight_share"`, the share of the weight on
        the matching events; `"event_share"`, the matching events' share of the valid
        events; `"lift"`, their ratio. NaN where a query has no matching event (or no
        weight).
    """
    weights = np.asarray(weights, dtype=np.float64)
    query_ids, key_ids = np.asarray(query_ids), np.asarray(key_ids)
    if (weights.ndim != 4 or query_ids.shape != weights.shape[::2]
            or key_ids.shape != (weights.shape[0], weights.shape[3])):
        raise ValueError("`weights` must be [B, heads, m, n] for query_ids [B, m] and key_ids "
                         f"[B, n]. Received: weights.shape={weights.shape}, "
                         f"query_ids.shape={query_ids.shape}, key_ids.shape={key_ids.shape}")
    if (weights < 0).any():
        raise ValueError("`weights` must be non-negative. Received: a weight of "
                         f"{weights.min()}")
    key_mask = key_ids != 0 if key_mask is None else np.asarray(key_mask, bool)
    match = (query_ids[:, :, None] == key_ids[:, None, :]) & key_mask[:, None, :]  # [B, m, n]
    valid_weights = np.where(key_mask[:, None, None, :], weights, 0.0)
    total = valid_weights.sum(axis=-1)
    num_matches = match.sum(axis=-1)[:, None, :]  # [B, 1, m]
    defined = (num_matches > 0) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weight_share = (valid_weights * match[:, None]).sum(axis=-1) / total
        event_share = np.broadcast_to(num_matches / key_mask.sum(axis=-1)[:, None, None],
                                      weight_share.shape)
        return {"weight_share": np.where(defined, weight_share, math.nan),
                "event_share": np.where(defined, event_share, math.nan),
                "lift": np.where(defined, weight_share / event_share, math.nan)}


def non_finite_weights(model):
    """`{variable path: (NaN or infinite values, values)}` of every floating-point weight of
    a Keras `model` that holds NaN or infinity; empty when all are finite."""
    found = {}
    for variable in model.weights:
        value = np.asarray(variable)
        if value.dtype.kind in "fc":
            bad = value.size - int(np.count_nonzero(np.isfinite(value)))
            if bad:
                found[variable.path] = (bad, value.size)
    return found


def learned_sharpness(model):
    """The learnable sharpness of every linear attention of `model` (or layer), by the
    attention's path: `{"interest/attention": {"temperature": [heads]},
    "candidate_self_attention": {"focusing_factor": [heads]}}` for an `ifa` with
    `learnable_temperature` and `ram_learnable_focusing_factor`.

    `temperature` is tau_h = exp(t_h) of `phi(x / tau_h)`: 1 at the start, below 1 where a
    head has grown sharper. `focusing_factor` is the power p each head applies (the weight
    floored at 1, as the layer does). Layers without learnable sharpness are absent; a model
    without any gives `{}`. Read it beside `attention_concentration` on the same model.
    """
    sharpness = {}
    for variable in model.weights:
        path, _, name = variable.path.rpartition("/")
        if name == "log_temperature":
            sharpness.setdefault(path, {})["temperature"] = np.exp(
                np.asarray(variable.numpy(), np.float64))
        elif name == "focusing_factor":
            sharpness.setdefault(path, {})["focusing_factor"] = np.maximum(
                np.asarray(variable.numpy(), np.float64), 1.0)
    return sharpness
