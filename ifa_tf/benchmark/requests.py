"""Synthetic requests of a given shape for timing: ids spread over a realistic range."""

import numpy as np

from ifa_tf.schema import USER


def random_request(schema, m, n, batch=1, seed=0, id_range=10**7):
    """A feature dict (NumPy int64) of `batch` requests with m candidates and n events."""
    rng = np.random.default_rng(seed)
    features = {}
    for name in schema.feature_names:
        role = schema.role(name)
        shape = (batch,) if role == USER else (batch, n if name.startswith("seq_") else m)
        if name == "seq_action":
            values = rng.integers(0, 8, shape)
        elif name == "seq_time_delta":
            values = rng.integers(0, 10**8, shape)
        elif name.startswith("cand_cross_"):
            values = rng.integers(0, 100, shape)
        else:
            values = rng.integers(1, id_range, shape)
        features[name] = values.astype(np.int64)
    return features


def random_labels(schema, batch, m, seed=0):
    rng = np.random.default_rng(seed + 1)
    return {task: (rng.random((batch, m)) < 0.1).astype(np.float32) for task in schema.tasks}
