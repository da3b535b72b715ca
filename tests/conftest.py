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
