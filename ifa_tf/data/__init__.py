"""Candidate-set data: the TFRecord format, the tf.data pipeline, the lifelong-behaviour
simulator and the interaction-log converter.

- `records`: one `tf.train.Example` per request, sharded writing, `metadata.json`.
- `make_dataset`: TFRecords -> padded `(features, labels)` batches for `model.fit`.
- `Simulator`, `SimulatorConfig`, `write_synthetic`: the simulator (`ifa-data synthetic`);
  `lifelong_config`: its `lifelong` preset; `read_ceiling_ladder`, `format_ceiling_ladder`:
  the ceiling ladder recorded beside simulated splits.
- `LogConfig`, `convert_log`, `convert_preset` (MovieLens-100K and -1M): logs -> TFRecords
  (`ifa-data from-log`); `string_id` and `read_vocabulary` map raw ids to and from theirs.
- `ifa_tf.data.tfds_builder`: a TensorFlow Datasets builder over the simulator (imported on
  demand, since it imports tensorflow_datasets).
"""

from ifa_tf.data.log_converter import (LogConfig, convert_log, convert_movielens_100k,
                                       convert_preset, read_vocabulary, string_id)
from ifa_tf.data.pipeline import make_dataset
from ifa_tf.data.records import (METADATA_FILENAME, DataFormatError, ShardedWriter,
                                 decode_example, encode_example, read_metadata,
                                 write_metadata)
from ifa_tf.data.simulator import (Simulator, SimulatorConfig, format_ceiling_ladder,
                                   lifelong_config, read_ceiling_ladder, simulator_schema,
                                   write_synthetic)

__all__ = [
    "METADATA_FILENAME", "DataFormatError", "LogConfig", "ShardedWriter", "Simulator",
    "SimulatorConfig", "convert_log", "convert_movielens_100k", "convert_preset",
    "decode_example", "encode_example", "format_ceiling_ladder", "lifelong_config",
    "make_dataset", "read_ceiling_ladder", "read_metadata", "read_vocabulary",
    "simulator_schema", "string_id", "write_metadata", "write_synthetic",
]
