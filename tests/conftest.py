import json
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def write_tiny_dataset():
    """`write(directory, embedding_buckets, **SimulatorConfig fields)`: simulator TFRecords
    in two shards plus `schema.json` with small hash tables (fast builds and checkpoints);
    returns the directory."""
    from ifa_tf.data import simulator

    def write(directory, embedding_buckets, **config):
        simulator.write_synthetic(directory, simulator.SimulatorConfig(**config),
                                  num_shards=2)
        schema = simulator.simulator_schema().to_dict()
        schema["embedding_buckets"] = dict(embedding_buckets)
        with open(os.path.join(directory, "schema.json"), "w") as f:
            json.dump(schema, f)
        return directory

    return write


@pytest.fixture(scope="session")
def six_step_data(tmp_path_factory, write_tiny_dataset):
    """48 training requests and 16 test ones: 6 steps an epoch at batch size 8."""
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("six_step_data")),
        {"user_id": 101, "item_id": 509, "category_id": 29, "author_id": 103},
        num_requests=64, seed=3, max_seq_len=20, max_candidates=8, num_items=500,
        num_authors=100, truth_samples=4, test_fraction=0.25)


@pytest.fixture(scope="session")
def stateful_export(tmp_path_factory):
    """`(keras model, version dir, loaded signatures)` of a decay (stateful) IFA, shared by
    the stateful export and state store tests."""
    import tensorflow as tf

    from ifa_tf import export
    from test_stateful import SCHEMA, build

    model = build()
    export_dir = export.export_saved_model(model, tmp_path_factory.mktemp("stateful") / "ifa",
                                           schema=SCHEMA, warmup_shapes=((1, 4, 6),))
    return model, export_dir, tf.saved_model.load(export_dir).signatures
