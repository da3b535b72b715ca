import keras
from keras import ops

from ifa_tf.layers.masked_target_attention import MaskedTargetAttention
from ifa_tf.layers.simhash import add_hyperplanes, simhash_bits
from ifa_tf.layers.masked_average_pooling import MaskedAveragePooling
from ifa_tf.layers.top_k import gather_positions, most_recent_mask, select_top_k
from ifa_tf.layers.validation import check_choice, check_positive_int, check_seed

# How MHFT mixes each frequency's channels: "paper", a complex block matrix per frequency
# and head (a filter that can tell frequencies apart); "released", what the official code
# computes (its einsum "blnd,ndd->blnd" takes the diagonal of one block matrix: one complex
# gain per channel, the same at every frequency).
FOURIER_FILTERS = ("paper", "released")
# The granularities, in the order MHTA reads them.
GRANULARITIES = ("target", "local", "global")


@keras.saving.register_keras_serializable(package="ifa_tf")
class MIRRNAttention(keras.layers.Layer):
    """MIRRN (Xu et al., "Multi-granularity Interest Retrieval and Refinement Network for
    Long-Term User Behavior Modeling in CTR Prediction", KDD 2025).

    Three queries at three time scales retrieve their own sub-sequences, which are refined
    and fused:

    1. Queries: the target (each candidate), local (masked mean of the last
       `local_window` events' items) and global (masked mean of every event's item). The
       local and global ones are the user's: retrieved once, shared by every candidate.
    2. Retrieval: per query, the k valid events whose SimHash signatures (`hash_bits`
       fixed random hyperplanes, shared by the three) are nearest in Hamming distance, then
       re-sorted oldest first, so that their order survives for the Fourier filter.
    3. TAPE: each retrieved event gets `tape_scale * P[distance]`, P a learned table of its
       distance from the newest event (clipped at `max_positions - 1`).
    4. MHFT, one block per granularity: X + FFT^-1(W . FFT(X)) over the k rows, dropout on
       the filtered part, LayerNorm (epsilon 1e-12), where W mixes each head's channels
       (`num_filter_heads` heads) per frequency (`fourier_filter`).
    5. Pooling: the masked mean of the refined rows gives one interest per granularity.
    6. MHTA: multi-head target attention (`num_heads`, `key_dim`) of the candidate over its
       three interests, projected back to the events' width.

    Masking: padded events are never retrieved, retrieved slots beyond the valid events
    are zero rows in the filter and left out of the pooling; padded candidates get 0.

    Args:
        k: events retrieved per query (the official configs: 4; the zoo's budget: 100).
        hash_bits: SimHash signature length (MIRRN: 32).
        hash_seed: seed of the hyperplanes; `None` draws from Keras' global seed.
        local_window: events the local query averages (MIRRN: 16).
        num_filter_heads: MHFT's heads (MIRRN: 4); must divide the events' width.
        fourier_filter: `"paper"` or `"released"` (`FOURIER_FILTERS`).
        dropout: MHFT's dropout on the filtered part (MIRRN: 0.1).
        tape_scale: TAPE's factor (MIRRN: 0.02).
        max_positions: rows of TAPE's table.
        num_heads, key_dim: MHTA's heads and head size (MIRRN: 4 heads, 32 wide in all).

    Call arguments:
        candidates: [B, m, d], in the items' space.
        sequence_items: [B, n, d], the events' items (hashed, averaged into the queries).
        sequence: [B, n, d_v], the events (items and context), what is retrieved.
        candidate_mask: optional bool [B, m].
        sequence_mask: optional bool [B, n].

    Returns:
        [B, m, d_v].
    """

    def __init__(self, k=100, hash_bits=32, hash_seed=None, local_window=16,
                 num_filter_heads=4, fourier_filter="paper", dropout=0.1, tape_scale=0.02,
                 max_positions=10_001, num_heads=4, key_dim=8, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("k", k), ("hash_bits", hash_bits), ("local_window", local_window),
                            ("num_filter_heads", num_filter_heads),
                            ("max_positions", max_positions), ("num_heads", num_heads),
                            ("key_dim", key_dim)):
            check_positive_int(name, value)
        check_seed("hash_seed", hash_seed)
        check_choice("fourier_filter", fourier_filter, FOURIER_FILTERS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
        self.k = k
        self.hash_bits = hash_bits
        self.hash_seed = hash_seed
        self.local_window = local_window
        self.num_filter_heads = num_filter_heads
        self.fourier_filter = fourier_filter
        self.dropout = dropout
        self.tape_scale = float(tape_scale)
        self.max_positions = max_positions
        self.num_heads = num_heads
        self.key_dim = key_dim

    def build(self, candidates_shape, sequence_items_shape, sequence_shape,
              candidate_mask_shape=None, sequence_mask_shape=None):
        depth, width = candidates_shape[-1], sequence_shape[-1]
        if sequence_items_shape[-1] != depth:
            raise ValueError("Candidates and the events' items must be embedded in one space "
                             f"to be hashed alike. Received: candidates_shape="
                             f"{candidates_shape}, sequence_items_shape={sequence_items_shape}")
        if width % self.num_filter_heads:
            raise ValueError(f"`num_filter_heads` must divide the events' width {width}. "
                             f"Received: num_filter_heads={self.num_filter_heads}")
        self.hyperplanes = add_hyperplanes(self, depth, self.hash_bits, self.hash_seed)
        self.positions = self.add_weight(name="positions", shape=(self.max_positions, width),
                                         initializer="uniform")
        head = width // self.num_filter_heads
        frequencies = self.k // 2 + 1
        # "released" stores the code's one block matrix per head; only its diagonal acts.
        shape = ((frequencies, self.num_filter_heads, head, head) if self.fourier_filter
                 == "paper" else (self.num_filter_heads, head, head))
        self.filters = {}
        self.norms = {}
        for granularity in GRANULARITIES:
            # Small at the start, as the official code draws them: the block begins as
            # LayerNorm(X) and learns what to add.
            self.filters[granularity] = [
                self.add_weight(name=f"{granularity}_filter_{part}", shape=shape,
                                initializer=keras.initializers.RandomNormal(stddev=0.02))
                for part in ("real", "imag")]
            norm = keras.layers.LayerNormalization(epsilon=1e-12, dtype=self.dtype_policy,
                                                   name=f"{granularity}_norm")
            norm.build((None, None, self.k, width))
            self.norms[granularity] = norm
        self._dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self._pooling = MaskedAveragePooling(dtype=self.dtype_policy, name="query_pooling")
        self._fusion = MaskedTargetAttention(self.num_heads, self.key_dim, output_dim=width,
                                             dtype=self.dtype_policy, name="fusion")
        self._fusion.build(candidates_shape, (*candidates_shape[:-1], 3, width))
        self.built = True

    def call(self, candidates, sequence_items, sequence, candidate_mask=None,
             sequence_mask=None, training=None):
        if sequence_mask is None:
            sequence_mask = ops.ones(ops.shape(sequence)[:2], dtype="bool")
        queries = {"target": candidates}  # [B, m, d] or [B, 1, d]
        queries["local"], queries["global"] = self.user_queries(sequence_items, sequence_mask)
        sequence_signs = self._signs(sequence_items)  # [B, n, bits]
        interests = []
        for granularity in GRANULARITIES:
            indices, selected_mask = self.retrieve(self._signs(queries[granularity]),
                                                   sequence_signs, sequence_mask)
            rows = self.refine(granularity, sequence, sequence_mask, indices, selected_mask,
                               training)
            weights = ops.cast(selected_mask, rows.dtype)[..., None]
            pooled = ops.sum(rows * weights, axis=-2) / ops.maximum(
                ops.sum(weights, axis=-2), 1.0)  # [B, m or 1, d_v]
            interests.append(pooled * ops.ones_like(candidates[..., :1]))
        stacked = ops.stack(interests, axis=-2)  # [B, m, 3, d_v]
        return self._fusion(candidates, stacked, query_mask=candidate_mask)

    def user_queries(self, sequence_items, sequence_mask):
        """The local and global queries, [B, 1, d] each: masked means of the last
        `local_window` valid events' items and of every valid event's."""
        recent = most_recent_mask(sequence_mask, self.local_window)
        return (self._pooling(sequence_items, mask=recent)[:, None, :],
                self._pooling(sequence_items, mask=sequence_mask)[:, None, :])

    def retrieve(self, query_signs, sequence_signs, sequence_mask):
        """The k valid events nearest in Hamming distance, oldest first, and their mask,
        [B, q, k] each (q = m or 1). Slots beyond the valid events come last, masked."""
        agreement = ops.matmul(query_signs, ops.transpose(sequence_signs, (0, 2, 1)))
        indices, selected_mask, _ = select_top_k(agreement, sequence_mask[:, None, :], self.k)
        length = ops.shape(sequence_signs)[1]
        order = ops.where(selected_mask, indices, length + ops.arange(self.k, dtype="int32"))
        order = ops.sort(ops.cast(order, "int32"), axis=-1)
        selected_mask = order < length
        return ops.where(selected_mask, order, 0), selected_mask

    def refine(self, granularity, sequence, sequence_mask, indices, selected_mask,
               training=None):
        """TAPE and MHFT on the retrieved events: [B, q, k, d_v]."""
        rows = gather_positions(sequence, indices)
        # Distance from the newest valid event: 0 for it, then 1, 2, ...
        count = ops.sum(ops.cast(sequence_mask, "int32"), axis=1)[:, None, None]
        distance = ops.clip(count - 1 - ops.cast(indices, "int32"), 0, self.max_positions - 1)
        rows = rows + self.tape_scale * ops.cast(ops.take(self.positions, distance, axis=0),
                                                 rows.dtype)
        rows = rows * ops.cast(selected_mask, rows.dtype)[..., None]
        filtered = self._filter(granularity, rows)
        return self.norms[granularity](rows + self._dropout(filtered, training=training))

    def _filter(self, granularity, rows):
        """FFT^-1(W . FFT(rows)) over the k axis, per head's channels, in float32."""
        batch, queries, width = ops.shape(rows)[0], ops.shape(rows)[1], rows.shape[-1]
        heads, head = self.num_filter_heads, width // self.num_filter_heads
        signal = ops.transpose(ops.cast(rows, "float32"), (0, 1, 3, 2))  # [B, q, d, k]
        real, imag = ops.rfft(signal, fft_length=self.k)  # [B, q, d, F]
        frequencies = self.k // 2 + 1
        split = (batch, queries, heads, head, frequencies)
        real, imag = ops.reshape(real, split), ops.reshape(imag, split)
        kernel_real, kernel_imag = (ops.cast(w, "float32") for w in self.filters[granularity])
        if self.fourier_filter == "paper":
            def mix(x, w):
                return ops.einsum("bqncf,fnce->bqnef", x, w)
        else:
            # The diagonal: one complex gain per channel, the same at every frequency.
            def mix(x, w):
                gain = ops.diagonal(w, axis1=-2, axis2=-1)  # [heads, head]
                return x * gain[None, None, :, :, None]
        out_real = mix(real, kernel_real) - mix(imag, kernel_imag)
        out_imag = mix(real, kernel_imag) + mix(imag, kernel_real)
        shape = (batch, queries, width, frequencies)
        filtered = ops.irfft((ops.reshape(out_real, shape), ops.reshape(out_imag, shape)),
                             fft_length=self.k)  # [B, q, d, k]
        return ops.cast(ops.transpose(filtered, (0, 1, 3, 2)), rows.dtype)

    def _signs(self, embeddings):
        return ops.where(simhash_bits(embeddings, self.hyperplanes), 1.0, -1.0)

    def compute_output_shape(self, candidates_shape, sequence_items_shape, sequence_shape,
                             candidate_mask_shape=None, sequence_mask_shape=None):
        return (*candidates_shape[:-1], sequence_shape[-1])

    def get_config(self):
        return {**super().get_config(), "k": self.k, "hash_bits": self.hash_bits,
                "hash_seed": self.hash_seed, "local_window": self.local_window,
                "num_filter_heads": self.num_filter_heads,
                "fourier_filter": self.fourier_filter, "dropout": self.dropout,
                "tape_scale": self.tape_scale, "max_positions": self.max_positions,
                "num_heads": self.num_heads, "key_dim": self.key_dim}

