"""Arithmetic of IFA's attention module (`NormalizedLinearAttention`), counted by hand."""


def linear_attention_flops(m, n, query_dim, key_dim_in, value_dim_in, num_heads, key_dim,
                           value_dim, output_dim):
    """FLOPs (multiply-add = 2) of one request through `NormalizedLinearAttention`.

    Projections (Q, K, V, output), phi(K)^T V, phi(K)^T 1, phi(Q) (phi(K)^T V), the degree
    phi(Q) (phi(K)^T 1) and the division; feature maps and masks count one FLOP per element.
    """
    hk, hv = num_heads * key_dim, num_heads * value_dim
    projections = 2 * (m * query_dim * hk + n * key_dim_in * hk + n * value_dim_in * hv
                       + m * hv * output_dim)
    feature_maps = m * hk + n * hk + n * hk + n * hv  # phi(Q), phi(K), key mask on K and V
    key_summaries = 2 * n * num_heads * key_dim * value_dim + n * hk
    query_side = 2 * m * num_heads * key_dim * value_dim + 2 * m * hk + m * hv
    return projections + feature_maps + key_summaries + query_side


def linear_attention_bytes(m, n, query_dim, key_dim_in, output_dim, weights, itemsize=4):
    """Bytes that must move at least once: inputs, weights and the output."""
    return itemsize * (m * query_dim + n * key_dim_in + m * output_dim + weights)
