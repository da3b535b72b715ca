import keras
from keras import ops

from ifa_tf.layers.simhash import add_hyperplanes, simhash_bits
from ifa_tf.layers.top_k import gather_positions, select_top_k
from ifa_tf.layers.validation import check_int_in_range, check_positive_int, check_seed

# A member whose distance to its cluster's centroid is within this relative margin of the
# nearest one ties with it (float rounding must not decide): the most recent of them wins.
_NEAREST_TOLERANCE = 1e-5


@keras.saving.register_keras_serializable(package="ifa_tf")
class TWINV2Clustering(keras.layers.Layer):
    """TWIN-V2's compression of a behaviour sequence into clusters of similar events (Si et
    al., "TWIN V2: Scaling Ultra-Long User Behavior Sequence Modeling for Enhanced CTR
    Prediction at Kuaishou", CIKM 2024), computed in the model, per request.

    TWIN-V2 clusters each user's life-cycle history offline: the events are split into M
    groups by play-completion ratio, then each group is split recursively by k-means until
    no cluster holds more than gamma events; each cluster becomes a virtual item. This
    layer approximates that hierarchy with operations a model can run on every request:

    1. Group: events are grouped by `groups` (the zoo's action bit sets, our analogue of
       the play-completion groups), clipped to `[0, num_groups - 1]`.
    2. Split: within a group, a cell of more than `max_cluster_size` events is halved by a
       random hyperplane through the origin (one SimHash bit of the item embedding), and
       each half again, down to `cluster_bits` hyperplanes: a binary hierarchy in which
       only oversized cells are split, as TWIN-V2 splits only oversized clusters. More
       bits allow finer clusters. Random hyperplanes (locality-sensitive hashing) stand in
       for k-means: similar items share a side of most hyperplanes, and no iteration is
       needed.
    3. Cut: a cell still larger than `max_cluster_size` after the last hyperplane (events
       that hash alike at every level, e.g. one item watched many times) is cut, oldest
       first, into clusters of at most `max_cluster_size` events.

    Each cluster becomes a virtual item: the item embedding of the member closest to the
    cluster's centroid (the paper's categorical features of the item closest to the
    centroid; ties within float rounding go to the most recent member), plus, when
    `events` are given, the mean of the members' context embeddings, `events - items`
    (the action and time the ranker adds to each item: the paper's numerical features,
    averaged); and its size n_c, which cluster-aware attention adds as ln(n_c) to the
    cluster's score (`TWINAttention`'s `key_bias`).

    Why in the model rather than offline: a request needs nothing but the user's raw
    sequence, as for every other zoo model (no clustering job, no cluster features in the
    schema or the TFRecords, and TF Serving receives the same request). The price is the
    clustering's cost on every request, O(n (d + L) + n log n) for L = `cluster_bits`
    (one sort, L + 1 passes over the sorted events, a few segment sums), where TWIN-V2
    re-clusters periodically and shares the cost among many requests. The clustering
    reads the item embeddings through a stop gradient: it follows the embeddings as they
    train (as the paper re-clusters with the latest ones) but is not itself trained; the
    clusters' embeddings keep their gradients.

    Static shapes: the cluster axis has n slots, the C clusters of a request first (in the
    order of group, signature, then oldest member) and C <= n; `max_clusters` keeps only
    the `max_clusters` clusters with the most recent events, most recent first, so that
    what reads the clusters (TWIN's GSU) costs O(max_clusters) per candidate instead of
    O(n): that is where TWIN-V2 saves time.

    Masking: padded events (`sequence_mask` False) join no cluster, and neither their
    embeddings nor their groups change anything; a request without valid events has no
    cluster. The result does not depend on where the padding lies, only on the valid
    events' order.

    Args:
        max_cluster_size: gamma, the most events in one cluster (20: the paper's value as
            we recall it, not verified against the paper).
        cluster_bits: hyperplanes, the depth of the split hierarchy (at most 2 **
            cluster_bits cells per group before the cut).
        num_groups: M, the groups `groups` are clipped into (8: the action bit sets of
            click, long view and like).
        max_clusters: keep only this many clusters, those with the most recent events;
            `None` keeps all.
        hash_seed: seed of the hyperplanes; `None` draws them from Keras' global seed
            (`keras.utils.set_random_seed`). They are saved with the weights either way.

    Call arguments:
        items: the events' item embeddings [B, n, d]: what is hashed, compared with the
            centroids and carried by the representative.
        events: optional [B, n, d], the events' embeddings (item plus context); without
            them a cluster carries its representative's item embedding alone.
        groups: optional int [B, n], each event's group (e.g. `seq_action`); `None`: one
            group.
        sequence_mask: optional bool [B, n], True for valid events.

    Returns:
        `(cluster_embeddings, cluster_sizes, cluster_mask)`: [B, S, d], int32 [B, S] (0 for
        empty slots) and bool [B, S], where S = n, or `max_clusters` when given. Empty
        slots have zero embeddings.

    Backends: `keras.ops` throughout (one argsort, cumulative sums, segment sums and
    maxima with per-request offsets). The sort key is int64: on JAX, set
    `JAX_ENABLE_X64=1`, as the models' int64 ids need anyway.

    Example:
    >>> clustering = TWINV2Clustering(max_cluster_size=20, cluster_bits=8)
    >>> clusters, sizes, cluster_mask = clustering(sequence_items, sequence,
    ...                                            groups=seq_action,
    ...                                            sequence_mask=sequence_mask)
    """

    def __init__(self, max_cluster_size=20, cluster_bits=8, num_groups=8, max_clusters=None,
                 hash_seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("max_cluster_size", max_cluster_size)
        # The sort key holds (group, signature, position) in an int64.
        check_int_in_range("cluster_bits", cluster_bits, 1, 24)
        check_int_in_range("num_groups", num_groups, 1, 1024)
        if max_clusters is not None:
            check_positive_int("max_clusters", max_clusters)
        check_seed("hash_seed", hash_seed)
        self.max_cluster_size = max_cluster_size
        self.cluster_bits = cluster_bits
        self.num_groups = num_groups
        self.max_clusters = max_clusters
        self.hash_seed = hash_seed

    def build(self, items_shape, events_shape=None, groups_shape=None,
              sequence_mask_shape=None):
        if events_shape is not None and events_shape[-1] != items_shape[-1]:
            raise ValueError(
                "`events` must be the items plus their context, as wide as `items`. "
                f"Received: items_shape={items_shape}, events_shape={events_shape}")
        self.hyperplanes = add_hyperplanes(self, items_shape[-1], self.cluster_bits,
                                           self.hash_seed)
        self.built = True

    def call(self, items, events=None, groups=None, sequence_mask=None):
        batch, length = ops.shape(items)[0], ops.shape(items)[1]
        keys = ops.stop_gradient(ops.cast(items, "float32"))
        mask = (ops.ones((batch, length), "bool") if sequence_mask is None
                else ops.cast(sequence_mask, "bool"))
        order, sorted_valid, starts = self._sorted_cells(keys, groups, mask, length)

        # Per-request slots, length + 1 each: the last gathers the padding, then is dropped.
        offsets = ops.arange(batch, dtype="int32")[:, None] * (length + 1)
        num_segments = batch * (length + 1)
        rank = ops.broadcast_to(ops.arange(length, dtype="int32")[None], (batch, length))
        # Cut cells larger than gamma, oldest first (a cell's events are sorted by time).
        cell = ops.cumsum(ops.cast(starts, "int32"), axis=1) - 1 + offsets
        first = ops.segment_sum(_flat(ops.where(starts, rank, 0)), _flat(cell),
                                num_segments=num_segments)
        within = rank - ops.reshape(ops.take(first, _flat(cell), axis=0), (batch, length))
        opens = ops.logical_and(sorted_valid, within % self.max_cluster_size == 0)
        cluster = ops.cumsum(ops.cast(opens, "int32"), axis=1) - 1
        slot = _flat(ops.where(sorted_valid, cluster, length) + offsets)  # [B * n]

        def per_slot(values):  # [B * (n + 1), ...] -> [B, n, ...], the padding slot dropped
            return ops.reshape(values, (batch, length + 1, *values.shape[1:]))[:, :length]

        counts = ops.segment_sum(ops.ones_like(slot), slot, num_segments=num_segments)
        sizes = per_slot(counts)
        cluster_mask = sizes > 0
        # The representative: the member nearest to the centroid of the members' items.
        depth = keys.shape[-1]
        members = ops.reshape(gather_positions(keys, order), (-1, depth))
        centroids = ops.segment_sum(members, slot, num_segments=num_segments) / ops.cast(
            ops.maximum(counts, 1), "float32")[:, None]
        distance = ops.sum(ops.square(members - ops.take(centroids, slot, axis=0)), axis=-1)
        nearest = -ops.segment_max(-distance, slot, num_segments=num_segments)
        is_nearest = distance <= ops.take(nearest, slot, axis=0) * (1 + _NEAREST_TOLERANCE)
        positions = _flat(order)
        representative = per_slot(ops.segment_max(
            ops.where(is_nearest, positions, -1), slot, num_segments=num_segments))
        representative = ops.where(cluster_mask, representative, 0)
        embeddings = gather_positions(items, representative)
        if events is not None:
            context = gather_positions(events - items, order)
            context_sums = per_slot(ops.segment_sum(
                ops.reshape(context, (-1, depth)), slot, num_segments=num_segments))
            embeddings = embeddings + context_sums / ops.cast(
                ops.maximum(sizes, 1), context_sums.dtype)[..., None]
        embeddings = embeddings * ops.cast(cluster_mask, embeddings.dtype)[..., None]
        if self.max_clusters is None:
            return embeddings, sizes, cluster_mask
        latest = per_slot(ops.segment_max(positions, slot, num_segments=num_segments))
        kept, kept_mask, _ = select_top_k(ops.cast(latest, "float32"), cluster_mask,
                                          self.max_clusters)
        embeddings = gather_positions(embeddings, kept) * ops.cast(
            kept_mask, embeddings.dtype)[..., None]
        sizes = ops.where(kept_mask, gather_positions(sizes[..., None], kept)[..., 0], 0)
        return embeddings, sizes, kept_mask

    def _sorted_cells(self, keys, groups, mask, length):
        """The events sorted by (group, signature, position), padding last: `(order,
        sorted_valid, starts)`, where `starts` marks the first event of each cell of the
        split hierarchy (before the cut), all [B, n]."""
        bits = self.cluster_bits
        # Hyperplane 0 is the most significant bit: a prefix of the signature is a cell
        # of a coarser level, and the events of a cell are contiguous once sorted.
        place = ops.convert_to_tensor([2 ** (bits - 1 - j) for j in range(bits)], "int64")
        signature = ops.sum(ops.cast(simhash_bits(keys, self.hyperplanes), "int64") * place,
                            axis=-1)
        group = (ops.zeros_like(signature) if groups is None
                 else ops.clip(ops.cast(groups, "int64"), 0, self.num_groups - 1))
        # Padding: a group of its own after every real one, so it sorts last.
        group = ops.where(mask, group, self.num_groups)
        signature = ops.where(mask, signature, 0)
        position = ops.arange(length, dtype="int64")[None, :]
        order = ops.argsort((group * 2 ** bits + signature) * ops.cast(length, "int64")
                            + position, axis=1)
        group = ops.take_along_axis(group, order, axis=1)
        signature = ops.take_along_axis(signature, order, axis=1)
        sorted_valid = ops.take_along_axis(mask, order, axis=1)
        batch = ops.shape(order)[0]
        offsets = ops.arange(batch, dtype="int32")[:, None] * (length + 1)
        new_group = _changes(group)
        # Level l splits by the first l hyperplanes. An event's cell is that of the first
        # level at which it holds at most gamma events (the last level otherwise); two
        # neighbours in the sorted order are in one cell exactly when they agree at that
        # level, so the event's start flag is its level's.
        starts = decided = None
        for level in range(bits + 1):
            level_starts = ops.logical_or(
                new_group, _changes(ops.floor_divide(signature, 2 ** (bits - level))))
            if level == bits:
                fits = ops.ones_like(level_starts)
            else:
                run = ops.cumsum(ops.cast(level_starts, "int32"), axis=1) - 1 + offsets
                counts = ops.segment_sum(ops.ones_like(_flat(run)), _flat(run),
                                         num_segments=batch * (length + 1))
                fits = ops.reshape(ops.take(counts, _flat(run), axis=0),
                                   ops.shape(run)) <= self.max_cluster_size
            if starts is None:
                starts, decided = level_starts, fits
            else:
                starts = ops.where(decided, starts, level_starts)
                decided = ops.logical_or(decided, fits)
        return order, sorted_valid, starts

    def compute_output_shape(self, items_shape, events_shape=None, groups_shape=None,
                             sequence_mask_shape=None):
        slots = items_shape[1] if self.max_clusters is None else self.max_clusters
        return ((items_shape[0], slots, items_shape[-1]), (items_shape[0], slots),
                (items_shape[0], slots))

    def get_config(self):
        config = super().get_config()
        config.update({"max_cluster_size": self.max_cluster_size,
                       "cluster_bits": self.cluster_bits, "num_groups": self.num_groups,
                       "max_clusters": self.max_clusters, "hash_seed": self.hash_seed})
        return config


def _flat(x):
    return ops.reshape(x, (-1,))


def _changes(sorted_values):
    """bool [B, n]: True where a value differs from its predecessor, and at position 0."""
    return ops.concatenate([ops.ones_like(sorted_values[:, :1], "bool"), ops.not_equal(
        sorted_values[:, 1:], sorted_values[:, :-1])], axis=1)
