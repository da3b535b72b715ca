"""The feature schema: the one place that knows what a request looks like.

A request is one user, that user's lifelong behaviour sequence and the whole candidate set.
`FeatureSchema` declares which features exist and turns that declaration into everything
that needs it: the `keras.Input`s of every model, the `tf.io` parse spec of the TFRecord
pipeline, the `tf.TensorSpec`s of the serving signature, and input validation. Input names,
TFRecord feature names and signature input names are the same strings.

Naming rule (fixed by DESIGN.md): an item attribute `a` (`item_id`, `category_id`,
`author_id`, ...) appears as `seq_a` [B, n] in the sequence and `cand_a` [B, m] in the
candidate set, and both sides share one embedding table. Ids are raw int64; 0 is padding.
A position is valid where its item id (`seq_item_id` / `cand_item_id`) is non-zero.
"""

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

SEQUENCE_PREFIX = "seq_"
CANDIDATE_PREFIX = "cand_"
CROSS_PREFIX = "cand_cross_"
USER_PREFIX = "user_"
PADDING_ID = 0
# Stateful serving's times (an event's time, a state's reference time, a request's `now`)
# and ages (`seq_time_delta` there) are int64 seconds in [0, MAX_TIME]: from the Unix epoch
# to 2106-02-07 (2^32 - 1, an unsigned 32-bit Unix time). A time in milliseconds (1.7e12
# in 2024), far in the future or negative lies outside it, and no difference of two times
# in it overflows int64.
MAX_TIME = 2**32 - 1
# What ifa-data writes beside a dataset (`ifa_tf.data.records.METADATA_FILENAME`).
METADATA_FILENAME = "metadata.json"
_SCHEMA_HINT = ("The model's features come from its schema: build it for your data with "
                "ifa_tf.zoo.build(name, schema=<the dataset directory or its metadata.json>) "
                "(ifa-train: --schema, default the metadata.json beside --train_data).")

# Roles of features. Rank is that of a batch: user features are [B], all others [B, len].
USER = "user"
SEQUENCE = "sequence"
CANDIDATE = "candidate"
CROSS = "cross"
LABEL = "label"
EXTRA = "extra"

_DEFAULT_BUCKETS = {
    "user_id": 100_003,
    "item_id": 200_003,
    "category_id": 2_003,
    "author_id": 50_003,
}
_FALLBACK_BUCKETS = 10_007


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Declares the features of one request and derives every spec from them.

    Args:
        item_attributes: item attributes present on both the sequence (`seq_<a>`) and the
            candidate set (`cand_<a>`). Must include `"item_id"`, whose non-zero entries mark
            valid positions.
        user_features: request-wide int64 features, each [B]; names start with `user_`.
        sequence_context: sequence-only int64 features, each [B, n]: `seq_action` (bit set:
            1 click, 2 long view, 4 like) and `seq_time_delta` (seconds before the request).
        cross_features: user x candidate int64 features, each [B, m], named `cand_cross_*`
            (counts, bucketised logarithmically by the models).
        tasks: label names, each [B, m] in {0, 1}. The first task is the ESMM gate
            (p(impression | candidate)); every other task is predicted as
            p(gate | candidate) * p(task | gate).
        score_task: the task whose probability ranks the candidate set.
        extras: float32 [B, m] features stored beside the data (e.g. the simulator's ground
            truth probabilities) that the pipeline can read and models never do.
        embedding_buckets: hash buckets per id feature (attribute name or user feature name);
            features not listed get a default size.

    Example:
    >>> schema = FeatureSchema()
    >>> sorted(schema.keras_inputs())[:3]
    ['cand_author_id', 'cand_category_id', 'cand_cross_author_count']
    """

    item_attributes: tuple = ("item_id", "category_id", "author_id")
    user_features: tuple = ("user_id",)
    sequence_context: tuple = ("seq_action", "seq_time_delta")
    cross_features: tuple = ("cand_cross_author_count", "cand_cross_category_count")
    tasks: tuple = ("impression", "click", "long_view", "like")
    score_task: str = "click"
    extras: tuple = ()
    embedding_buckets: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for field in ("item_attributes", "user_features", "sequence_context",
                      "cross_features", "tasks", "extras"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"FeatureSchema.{field} must be a sequence of feature names. "
                    f"Received: {field}={value!r}")
            object.__setattr__(self, field, tuple(value))
        object.__setattr__(self, "embedding_buckets", dict(self.embedding_buckets))
        if "item_id" not in self.item_attributes:
            raise ValueError(
                "FeatureSchema.item_attributes must contain 'item_id' (its non-zero entries "
                f"mark valid positions). Received: item_attributes={self.item_attributes!r}")
        _check_prefix("user_features", self.user_features, USER_PREFIX)
        _check_prefix("sequence_context", self.sequence_context, SEQUENCE_PREFIX)
        _check_prefix("cross_features", self.cross_features, CROSS_PREFIX)
        if not self.tasks:
            raise ValueError("FeatureSchema.tasks must name at least one task. Received: tasks=()")
        if self.score_task not in self.tasks:
            raise ValueError(
                f"FeatureSchema.score_task must be one of tasks={self.tasks!r}. "
                f"Received: score_task={self.score_task!r}")
        names = [*self.feature_names, *self.tasks, *self.extras]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"FeatureSchema declares these names twice: {duplicates}")
        for name, size in self.embedding_buckets.items():
            if not isinstance(size, (int, np.integer)) or not 2 <= size <= 2**31:
                raise ValueError(
                    "FeatureSchema.embedding_buckets values must be integers in [2, 2^31] "
                    f"(bucket 0 is padding). Received: embedding_buckets[{name!r}]={size!r}")

    # ----------------------------------------------------------------- names and roles
    @property
    def sequence_features(self):
        return tuple(SEQUENCE_PREFIX + a for a in self.item_attributes) + self.sequence_context

    @property
    def candidate_features(self):
        return tuple(CANDIDATE_PREFIX + a for a in self.item_attributes)

    @property
    def feature_names(self):
        """Every model input, in a fixed order."""
        return (*self.user_features, *self.sequence_features, *self.candidate_features,
                *self.cross_features)

    @property
    def gate_task(self):
        return self.tasks[0]

    @property
    def action_tasks(self):
        return self.tasks[1:]

    def role(self, name):
        """The role (user, sequence, candidate, cross, label, extra) of a declared name."""
        if name in self.user_features:
            return USER
        if name in self.sequence_features:
            return SEQUENCE
        if name in self.candidate_features:
            return CANDIDATE
        if name in self.cross_features:
            return CROSS
        if name in self.tasks:
            return LABEL
        if name in self.extras:
            return EXTRA
        raise KeyError(f"{name!r} is not declared by this schema. Declared: "
                       f"{[*self.feature_names, *self.tasks, *self.extras]}")

    def rank(self, name):
        """Rank of the batched tensor: 1 for user features ([B]), 2 for the rest."""
        return 1 if self.role(name) == USER else 2

    def dtype(self, name):
        return "float32" if self.role(name) == EXTRA else "int64"

    def num_buckets(self, id_name):
        """Hash buckets of an id feature (`user_id`, or an attribute like `category_id`)."""
        return int(self.embedding_buckets.get(id_name,
                                              _DEFAULT_BUCKETS.get(id_name, _FALLBACK_BUCKETS)))

    # ------------------------------------------------------------------------- specs
    def keras_inputs(self):
        """`{name: keras.Input}` for every model input (no labels, no extras)."""
        import keras

        return {
            name: keras.Input(shape=() if self.rank(name) == 1 else (None,), dtype="int64",
                              name=name)
            for name in self.feature_names
        }

    def serving_specs(self):
        """`{name: tf.TensorSpec}` with dims [None] / [None, None], named after the feature."""
        import tensorflow as tf

        return {
            name: tf.TensorSpec([None] * self.rank(name), tf.int64, name=name)
            for name in self.feature_names
        }

    def parse_spec(self, with_labels=True, with_extras=False):
        """`tf.io.parse_example` spec: user features fixed scalars, the rest ragged."""
        import tensorflow as tf

        names = list(self.feature_names)
        if with_labels:
            names += self.tasks
        if with_extras:
            names += self.extras
        spec = {}
        for name in names:
            dtype = tf.float32 if self.dtype(name) == "float32" else tf.int64
            if self.rank(name) == 1:
                spec[name] = tf.io.FixedLenFeature([], dtype)
            else:
                spec[name] = tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64)
        return spec

    # -------------------------------------------------------------------- validation
    def validate_features(self, features, with_labels=False):
        """Checks a feature dict of arrays/tensors with known shapes; raises a clear error.

        Checks presence, rank, integer dtype, one batch size, one n across the sequence
        features and one m across the candidate features, cross features and labels.
        Dimensions that are unknown (None, symbolic) are skipped. Names the schema does not
        declare are an error; declared labels and extras are allowed and dropped.

        Returns:
            The model features alone (plus the labels with `with_labels=True`).
        """
        if not isinstance(features, Mapping):
            raise TypeError("Expected a dict of features keyed by name. Received: "
                            f"{type(features).__name__}")
        expected = list(self.feature_names) + (list(self.tasks) if with_labels else [])
        missing = [n for n in expected if n not in features]
        if missing:
            raise ValueError(f"Missing features {missing}. Received features: "
                             f"{sorted(features)}. {_SCHEMA_HINT}")
        declared = {*self.feature_names, *self.tasks, *self.extras}
        unexpected = sorted(n for n in features if n not in declared)
        if unexpected:
            raise ValueError(f"Unexpected features {unexpected}: the schema does not declare "
                             f"them. Declared features: {list(self.feature_names)}. "
                             f"{_SCHEMA_HINT}")
        dims = {}  # axis label -> (value, name that fixed it)
        for name in expected:
            value = features[name]
            shape = _static_shape(value)
            dtype = _dtype_name(value)
            is_integer = dtype is None or dtype.startswith("int") or dtype.startswith("uint")
            if not is_integer and self.role(name) != LABEL:
                raise ValueError(f"Feature {name!r} must hold integer ids (int64). "
                                 f"Received: dtype={dtype}")
            want = self.rank(name)
            if shape is None:
                continue
            if len(shape) != want:
                layout = "[batch]" if want == 1 else "[batch, length]"
                raise ValueError(f"Feature {name!r} must have rank {want} ({layout}). "
                                 f"Received: shape={tuple(shape)}")
            axes = [("batch", shape[0])]
            role = self.role(name)
            if want == 2:
                axes.append(("n" if role == SEQUENCE else "m", shape[1]))
            for axis, size in axes:
                if size is None:
                    continue
                if axis in dims and dims[axis][0] != size:
                    other_size, other = dims[axis]
                    what = {"batch": "batch size", "n": "sequence length n",
                            "m": "candidate count m"}[axis]
                    raise ValueError(
                        f"Feature {name!r} has {what} {size} but {other!r} has {other_size}; "
                        f"all {'features' if axis == 'batch' else axis + '-long features'} "
                        "of a request must agree.")
                dims.setdefault(axis, (size, name))
        return {name: features[name] for name in expected}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self):
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, config):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown FeatureSchema keys {unknown}. Valid keys: {sorted(known)}")
        return cls(**config)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))


def default_schema():
    """The DESIGN.md default: user id, item/category/author ids, actions, time deltas,
    two cross counts and the four tasks."""
    return FeatureSchema()


def resolve_schema(schema):
    """`None` -> default schema; a dict, a JSON file (a schema, or a dataset's
    `metadata.json`) or a dataset directory (its `metadata.json`) -> `FeatureSchema`; a
    schema as is."""
    if schema is None:
        return default_schema()
    if isinstance(schema, FeatureSchema):
        return schema
    if isinstance(schema, Mapping):
        return FeatureSchema.from_dict(dict(schema))
    if isinstance(schema, (str, os.PathLike)):
        path = os.fspath(schema)
        if os.path.isdir(path):
            path = os.path.join(path, METADATA_FILENAME)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{os.fspath(schema)} holds no {METADATA_FILENAME}: schema= takes a "
                    "dataset directory written by ifa-data, its metadata.json, or a schema "
                    "JSON file.")
        with open(path) as f:
            loaded = json.load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a JSON object (a schema, or a dataset's "
                             f"metadata.json). Received: {type(loaded).__name__}")
        return FeatureSchema.from_dict(loaded.get("schema", loaded))
    raise TypeError("schema must be a FeatureSchema, a dict, a dataset directory, a JSON file "
                    f"path or None. Received: {type(schema).__name__}")


def _check_prefix(field, names, prefix):
    for name in names:
        if not name.startswith(prefix):
            raise ValueError(f"FeatureSchema.{field} names must start with {prefix!r}. "
                             f"Received: {name!r}")


def _static_shape(value):
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return [None if d is None else int(d) for d in tuple(shape)]
    except (TypeError, ValueError):  # symbolic dims (TF unknown rank, JAX tracers)
        return None


def _dtype_name(value):
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    name = getattr(dtype, "name", None) or str(dtype)
    return str(name)
