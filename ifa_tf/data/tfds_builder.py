"""A TensorFlow Datasets builder over the simulator, so its data loads with `tfds.load`.

    import ifa_tf.data.tfds_builder  # registers "ifa_synthetic"
    train = tfds.load("ifa_synthetic/small", split="train", data_dir="~/tensorflow_datasets")
    batches = as_model_inputs(train, batch_size=32)   # (features, labels) for model.fit

Each example is one request: every feature of `simulator_schema()` (user features scalars,
the rest variable-length vectors, ground-truth extras included). Configs: `tiny` (tests),
`small`, `large` (n up to 10,000, m up to 1,000); any `SimulatorConfig` can be passed as
`builder_kwargs={"config": IfaSyntheticConfig(name=..., simulator_config=...)}`.
"""

import numpy as np
from etils import epath
import tensorflow as tf
import tensorflow_datasets as tfds

from ifa_tf.data import simulator as simulator_lib

_DESCRIPTION = """Requests of the ifa_tf lifelong-behaviour simulator: one user, the whole
behaviour sequence, the whole candidate set, impression and action labels, and the
ground-truth probabilities (truth_*) the labels were sampled from."""


class IfaSyntheticConfig(tfds.core.BuilderConfig):
    """A named `SimulatorConfig`."""

    def __init__(self, *, simulator_config, **kwargs):
        super().__init__(**kwargs)
        self.simulator_config = simulator_config


def _config(name, description, **overrides):
    return IfaSyntheticConfig(name=name, description=description,
                              simulator_config=simulator_lib.SimulatorConfig(**overrides))


class IfaSynthetic(tfds.core.GeneratorBasedBuilder):
    """The simulator's requests as a TFDS dataset (splits `train` and `test`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _config("tiny", "200 requests, n <= 100, m <= 30 (tests).", num_requests=200,
                max_seq_len=100, max_candidates=30, num_items=2_000, num_authors=300,
                truth_samples=32),
        _config("small", "2,000 requests, n <= 1,000, m <= 200.", num_requests=2_000),
        _config("large", "10,000 requests, n <= 10,000, m <= 1,000.", num_requests=10_000,
                max_seq_len=10_000, max_candidates=1_000, num_items=200_000,
                num_authors=20_000),
    ]
    DEFAULT_CONFIG_NAME = "small"

    # TFDS 4.9.10 finds a builder's source through `importlib_resources`, which it does not
    # declare as a dependency on Python >= 3.9; this file is the source.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self):
        schema = simulator_lib.simulator_schema()
        names = [*schema.feature_names, *schema.tasks, *schema.extras]
        features = {
            name: tfds.features.Tensor(
                shape=() if schema.rank(name) == 1 else (None,),
                dtype=np.float32 if schema.dtype(name) == "float32" else np.int64)
            for name in names}
        return self.dataset_info_from_configs(
            description=_DESCRIPTION, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        config = self.builder_config.simulator_config
        simulator = simulator_lib.Simulator(config)
        num_train = config.num_requests - config.num_test_requests
        splits = {"train": self._generate_examples(simulator, range(num_train))}
        if config.num_test_requests:
            splits["test"] = self._generate_examples(
                simulator, range(num_train, config.num_requests))
        return splits

    def _generate_examples(self, simulator, indices):
        for index in indices:
            yield index, simulator.request(index)


def as_model_inputs(dataset, batch_size=32, schema=None, with_extras=False):
    """Batches `tfds.load` examples into `(features, labels)` (or with extras as a third
    element), padded with 0 to the longest row of each batch, labels float32 — the
    structure `ifa_tf.data.make_dataset` yields."""
    schema = schema or simulator_lib.simulator_schema()

    def split(example):
        features = {name: example[name] for name in schema.feature_names}
        labels = {task: tf.cast(example[task], tf.float32) for task in schema.tasks}
        if not with_extras:
            return features, labels
        return features, labels, {name: example[name] for name in schema.extras}

    return dataset.padded_batch(batch_size).map(split, num_parallel_calls=tf.data.AUTOTUNE)
