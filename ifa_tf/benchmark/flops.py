"""Arithmetic of IFA's attention module (`NormalizedLinearAttention`), counted by hand."""


def linear_attention_flops(m, n, query_dim, key_dim_in, value_dim_in, num_heads, key_dim,
                           value_dim, output_dim=None):
    """FLOPs (multiply-add = 2) of one request through `NormalizedLinearAttention` as it
    computes: projections Q and K; per head phi(K_h)^T value, then times W_v,h (V is never
    projected over n); phi(K)^T 1; numerator phi(Q_h) S_h and degree phi(Q_h) z_h over the
    diagonal blocks only (the arithmetic needed, not the zeros a block-diagonal matmul
    multiplies); the output projection when `output_dim` is set. Feature maps, the key
    mask and the final scaling count one FLOP per element.
    """
    hk, hv = num_heads * key_dim, num_heads * value_dim
    projections = 2 * (m * query_dim * hk + n * key_dim_in * hk)
    if output_dim:
        projections += 2 * m * hv * output_dim
    feature_maps = m * hk + 2 * n * hk  # phi(Q), phi(K), key mask
    key_side = (2 * n * hk * value_dim_in + n * hk
                + 2 * num_heads * key_dim * value_dim_in * value_dim + 2 * hk * value_dim)
    query_side = 2 * m * num_heads * key_dim * value_dim + 2 * m * hk + m * hv
    return projections + feature_maps + key_side + query_side


def linear_attention_bytes(m, n, query_dim, key_dim_in, output_dim, weights, itemsize=4):
    """Bytes that must move at least once: inputs, weights and the output."""
    return itemsize * (m * query_dim + n * key_dim_in + m * output_dim + weights)
