"""The TFDS builder: `tfds.load` gives the simulator's requests, value for value."""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ifa_tf.data import simulator, tfds_builder


def test_tfds_load_reproduces_the_simulator(tmp_path):
    config = dataclasses.replace(
        tfds_builder.IfaSynthetic.builder_configs["tiny"].simulator_config,
        num_requests=12, test_fraction=0.25)
    builder_config = tfds_builder.IfaSyntheticConfig(name="test12", simulator_config=config)
    splits = tfds.load("ifa_synthetic", split=["train", "test"], data_dir=str(tmp_path),
                       builder_kwargs={"config": builder_config}, shuffle_files=False)
    sim = simulator.Simulator(config)
    schema = sim.schema
    seen = []
    for split in splits:
        for example in tfds.as_numpy(split):
            expected = sim.request(int(example["user_id"]) - 1)
            for name in [*schema.feature_names, *schema.tasks, *schema.extras]:
                np.testing.assert_array_equal(example[name], expected[name], err_msg=name)
            seen.append(int(example["user_id"]))
    assert sorted(seen) == list(range(1, 13))
    features, labels = next(iter(tfds_builder.as_model_inputs(splits[1], batch_size=3)))
    assert features["cand_item_id"].shape[0] == 3
    assert sorted(labels) == sorted(schema.tasks)
    assert labels["click"].dtype.name == "float32"
