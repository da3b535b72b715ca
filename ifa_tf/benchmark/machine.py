"""This machine's ceilings: float32 matmul throughput and memory bandwidth."""

import time

import numpy as np


def matmul_gflops(size=2048, repeats=10):
    """Best float32 GFLOP/s of a `size` x `size` TensorFlow matmul (all cores)."""
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))
    tf.linalg.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tf.linalg.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def memory_bandwidth_gbs(megabytes=512, repeats=5):
    """Best copy bandwidth (bytes read + written per second) of a large NumPy array."""
    source = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9
