"""Typed training configuration: a dataclass per concern, defaults from `zoo/<model>.yaml`,
overrides from flags, unknown keys rejected, the resolved config written beside the
checkpoints.

A config file (and its YAML) has four sections:

    model:            # `name` plus any override `zoo.build(name, ...)` accepts
      name: ifa
      embedding_dim: 16
    data:             # DataConfig
      batch_size: 64
    train:            # TrainConfig
      epochs: 2
    eval:             # EvalConfig
      protocol: split

Overrides are dotted `section.key=value` strings (`model.k=50`, `train.epochs=3`); values are
parsed as YAML (`[64, 32]`, `null`, `0.001`). A key that does not exist is an error naming it,
the closest valid one ("did you mean") and the valid keys; model keys are checked against
`zoo.valid_overrides(name)`, and, before Keras loads, against `zoo/model_options.json`, the
same lists written out (`write_model_options`; a test keeps it equal to the zoo).
"""

import dataclasses
import json
import os
import sys
from typing import Optional, Union

import yaml

from ifa_tf._suggest import did_you_mean

PROTOCOLS = ("split", "streaming")
STRATEGIES = ("default", "mirrored", "multi_worker")
ZOO_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "zoo")
MODEL_OPTIONS_FILE = "model_options.json"


@dataclasses.dataclass
class ModelConfig:
    """The zoo model and its `zoo.build` overrides (checked against the model's valid ones)."""

    name: str = "ifa"
    overrides: dict = dataclasses.field(default_factory=dict)

    def validate(self):
        from ifa_tf import zoo  # imports Keras: only once a config is checked in full

        if self.name not in zoo.list_models():
            raise ValueError(f"Unknown model {self.name!r} (model.name)"
                             f"{did_you_mean(self.name, zoo.list_models())}. Registered "
                             f"models: {zoo.list_models()}")
        check_model_keys(self.name, self.overrides, zoo.valid_overrides(self.name))


@dataclasses.dataclass
class DataConfig:
    """Where the TFRecords are and how batches are made (`ifa_tf.data.make_dataset`).

    Args:
        train_data: glob of the training shards (requests in time order for `streaming`).
        eval_data: glob of the evaluation shards (the later requests); empty: no evaluation
            (`split`) - `streaming` evaluates on the training stream itself.
        schema: a schema JSON path; empty: the `metadata.json` beside `train_data`.
        batch_size: global batch size (split across replicas).
        eval_batch_size: evaluation batch size; 0: `batch_size`.
        max_seq_len, max_candidates: caps on n and m (null: none).
        shuffle_buffer: examples in the shuffle buffer (`split` only; `streaming` keeps order).
        group_by_length: 0, or W >= 2 to batch requests of like sequence length together,
            sorted W batches at a time (`make_dataset`'s `group_by_length`; `split` only):
            far less padding where lengths vary widely, as in lifelong sequences.
        max_record_bytes: a larger record is an error naming it (`make_dataset`'s
            `max_record_bytes`: it would be parsed whole before `max_seq_len` cuts it); 0:
            no limit.
    """

    train_data: str = ""
    eval_data: str = ""
    schema: str = ""
    batch_size: int = 64
    eval_batch_size: int = 0
    max_seq_len: Optional[int] = None
    max_candidates: Optional[int] = None
    shuffle_buffer: int = 4096
    group_by_length: int = 0
    max_record_bytes: int = 16 * 2**20

    def validate(self):
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.shuffle_buffer", self.shuffle_buffer)
        if self.group_by_length != 0 and not (isinstance(self.group_by_length, int)
                                              and self.group_by_length >= 2):
            raise ValueError("data.group_by_length must be 0 (off) or an int >= 2 (batches "
                             f"per sorted window). Received: {self.group_by_length!r}")
        if self.eval_batch_size:
            _check_positive("data.eval_batch_size", self.eval_batch_size)
        if isinstance(self.max_record_bytes, bool) or not isinstance(
                self.max_record_bytes, int) or self.max_record_bytes < 0:
            raise ValueError("data.max_record_bytes must be an int >= 0 (0: no limit). "
                             f"Received: {self.max_record_bytes!r}")
        for key in ("max_seq_len", "max_candidates"):
            if getattr(self, key) is not None:
                _check_positive(f"data.{key}", getattr(self, key))


@dataclasses.dataclass
class TrainConfig:
    """How long and how to train.

    Args:
        epochs: passes over the training data; with `steps`, the number of checkpointed
            chunks the steps are spread over.
        steps: total training steps (the data repeats); null: `epochs` full passes.
        optimizer: a Keras optimizer name.
        learning_rate: its learning rate.
        seed: seeds weights, dropout and shuffling (`keras.utils.set_random_seed`).
        deterministic: a run repeated with the same seed, data, config and machine gives the
            same weights and metrics, bit for bit: the files are read in a fixed order and
            TensorFlow's ops are made deterministic for the rest of the process
            (`tf.config.experimental.enable_op_determinism`). Off (the default), parallel
            reads interleave records in whatever order they finish, so two runs of one seed
            differ. Costs input speed; a GPU op with no deterministic kernel raises
            `UnimplementedError`. A run resumed from its backup and `multi_worker` runs are
            not covered.
        strategy: `default` (one device), `mirrored` (all local GPUs) or `multi_worker`
            (`MultiWorkerMirroredStrategy` from `TF_CONFIG`).
        checkpoint_every_epochs: chief writes `checkpoints/epoch-XXXX.weights.h5` this often
            (0: never; the crash backup is written every epoch regardless).
        verbose: progress output of training and evaluation: 0 silent, 1 progress bars, 2
            one line per epoch; `auto`: 1 when stdout is a terminal, else 2 (logs get
            lines, not a redrawn bar).
    """

    epochs: int = 1
    steps: Optional[int] = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    seed: int = 0
    deterministic: bool = False
    strategy: str = "default"
    checkpoint_every_epochs: int = 1
    verbose: Union[int, str] = "auto"

    def validate(self):
        _check_positive("train.epochs", self.epochs)
        if self.steps is not None:
            _check_positive("train.steps", self.steps)
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ValueError("train.learning_rate must be a positive number. Received: "
                             f"train.learning_rate={self.learning_rate!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError("train.deterministic must be true or false. Received: "
                             f"train.deterministic={self.deterministic!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}. Received: "
                             f"train.strategy={self.strategy!r}")
        if self.verbose not in (0, 1, 2, "auto") or isinstance(self.verbose, bool):
            raise ValueError("train.verbose must be 0, 1, 2 or 'auto'. Received: "
                             f"train.verbose={self.verbose!r}")
        if not isinstance(self.checkpoint_every_epochs, int) or self.checkpoint_every_epochs < 0:
            raise ValueError("train.checkpoint_every_epochs must be an integer >= 0. Received: "
                             f"{self.checkpoint_every_epochs!r}")

    @property
    def resolved_verbose(self):
        """`verbose` with `auto` resolved for this process's stdout."""
        if self.verbose != "auto":
            return self.verbose
        return 1 if sys.stdout.isatty() else 2

    @property
    def steps_per_epoch(self):
        """Steps of one epoch: `ceil(steps / epochs)`, or None for a full pass."""
        if self.steps is None:
            return None
        return -(-self.steps // self.epochs)


@dataclasses.dataclass
class EvalConfig:
    """How the model is evaluated (`ifa_tf.metrics`).

    Args:
        protocol: `split` (train on `train_data`, then evaluate on `eval_data`, the later
            requests) or `streaming` (paper 5.1: every batch of the stream is evaluated with
            the current weights first, then trained on; cumulative metrics).
        ndcg_k: k of NDCG@k.
        max_batches: evaluate at most this many batches (null: all).
        length_groups: also report AUC in this many equal-size groups of requests by
            sequence length (short to long users; 0: not).
    """

    protocol: str = "split"
    ndcg_k: int = 10
    max_batches: Optional[int] = None
    length_groups: int = 3

    def validate(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"eval.protocol must be one of {list(PROTOCOLS)}. Received: "
                             f"eval.protocol={self.protocol!r}")
        _check_positive("eval.ndcg_k", self.ndcg_k)
        if (isinstance(self.length_groups, bool) or not isinstance(self.length_groups, int)
                or self.length_groups < 0):
            raise ValueError("eval.length_groups must be a non-negative integer. Received: "
                             f"eval.length_groups={self.length_groups!r}")
        if self.max_batches is not None:
            _check_positive("eval.max_batches", self.max_batches)


@dataclasses.dataclass
class Config:
    """The whole training run: model, data, training and evaluation."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self, check_model=True):
        """Checks every section; `check_model=False` leaves out the model section, whose
        check imports the zoo (Keras), for checks that must answer before it loads."""
        for section in _SECTIONS:
            if section != "model" or check_model:
                getattr(self, section).validate()
        if self.eval.protocol == "streaming" and self.train.strategy != "default":
            raise ValueError("eval.protocol='streaming' runs on one device; set "
                             f"train.strategy='default'. Received: {self.train.strategy!r}")
        return self

    def to_dict(self):
        """Nested plain dict; the model section is flat (`name` + overrides), as in YAML."""
        result = {section: dataclasses.asdict(getattr(self, section))
                  for section in _SECTIONS if section != "model"}
        return {"model": {"name": self.model.name, **self.model.overrides}, **result}

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values):
        """A validated config from a nested dict (unknown sections or keys are errors)."""
        config = cls()
        apply_dict(config, values or {})
        return config.validate()


_SECTIONS = ("model", "data", "train", "eval")
_SECTION_TYPES = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def apply_dict(config, values, source="config"):
    """Sets `values` ({section: {key: value}}) on `config`; unknown keys are errors."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must be a mapping of sections {list(_SECTIONS)}. "
                         f"Received: {type(values).__name__}")
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"Unknown config sections {unknown} in {source}"
                         f"{did_you_mean(unknown[0], _SECTIONS)}. Valid sections: "
                         f"{list(_SECTIONS)}")
    for section, entries in values.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"Section {section!r} of {source} must be a mapping. Received: "
                             f"{entries!r}")
        for key, value in entries.items():
            set_value(config, f"{section}.{key}", value)
    return config


def set_value(config, dotted_key, value):
    """Sets one `section.key`; unknown keys are errors naming the key and the valid ones."""
    section, _, key = dotted_key.partition(".")
    if section not in _SECTIONS or not key:
        raise ValueError(f"Unknown config key {dotted_key!r}"
                         f"{did_you_mean(section, _SECTIONS) if key else ''}: keys are "
                         f"'section.key' with section one of {list(_SECTIONS)}.")
    if section == "model":
        if key == "name":
            config.model.name = value
        else:
            config.model.overrides[key] = value
        return
    target = getattr(config, section)
    fields = [f.name for f in dataclasses.fields(_SECTION_TYPES[section])]
    if key not in fields:
        names = [f"{section}.{name}" for name in fields]
        raise ValueError(f"Unknown config key {dotted_key!r}{did_you_mean(dotted_key, names)}. "
                         f"Valid {section} keys: {names}")
    setattr(target, key, value)


def parse_override(text):
    """`'section.key=value'` -> `(key, value)`, the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"A config override must look like section.key=value. Received: "
                         f"{text!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def zoo_config_path(model_name, config_dir=None):
    return os.path.join(config_dir or ZOO_CONFIG_DIR, f"{model_name}.yaml")


def load_config(model_name=None, config_file=None, overrides=(), config_dir=None,
                check_model=True):
    """The resolved config: defaults < `zoo/<model>.yaml` < `config_file` < `overrides`.

    Args:
        model_name: the zoo model; its `zoo/<model>.yaml` supplies the defaults when present.
            None: taken from `config_file` or the overrides (`model.name=...`).
        config_file: an extra YAML file with the same sections.
        overrides: `section.key=value` strings or `(section.key, value)` pairs, applied last.
        config_dir: where the per-model YAML files are (default: the repository's `zoo/`).
        check_model: check the model name and keys against the zoo (imports Keras).
    """
    pairs = [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    file_values = {}
    if config_file:
        with open(config_file) as f:
            file_values = yaml.safe_load(f) or {}
    named = [v for k, v in pairs if k == "model.name"]
    named += [(file_values.get("model") or {}).get("name")] if not named else []
    named = [v for v in named if v is not None]
    if model_name is None:
        model_name = named[-1] if named else ModelConfig.name
    elif named and named[-1] != model_name:
        raise ValueError(f"The model is {model_name!r} but the config sets model.name="
                         f"{named[-1]!r}; name it once.")
    config = Config()
    config.model.name = model_name
    zoo_path = zoo_config_path(model_name, config_dir)
    if os.path.exists(zoo_path):
        with open(zoo_path) as f:
            apply_dict(config, yaml.safe_load(f) or {}, source=zoo_path)
    apply_dict(config, file_values, source=config_file or "config")
    for key, value in pairs:
        set_value(config, key, value)
    config.model.name = model_name
    config.validate(check_model=check_model)
    if check_model:
        from ifa_tf import zoo

        # The model's defaults written out: a run's saved config names the same model even
        # after a zoo default changes (and a run of the old default no longer matches it).
        config.model.overrides = zoo.resolve_overrides(model_name, config.model.overrides)
    return config


def check_model_keys(name, overrides, valid):
    """Raises ValueError for a key of `overrides` that model `name` does not take (`valid`:
    its option names, or None for a builder that takes any)."""
    if valid is None:
        return
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        keys = sorted(["name", *set(valid)])
        hint = did_you_mean("model." + unknown[0], ["model." + k for k in keys])
        raise ValueError(f"Unknown config keys {['model.' + k for k in unknown]} for model "
                         f"{name!r}{hint}. Valid model keys: {keys}")


def model_options():
    """`{model: sorted option names, or None}` of every registered model (imports Keras)."""
    from ifa_tf import zoo

    options = {}
    for name in zoo.list_models():
        valid = zoo.valid_overrides(name)
        options[name] = None if valid is None else sorted(set(valid))
    return options


def write_model_options(config_dir=None):
    """Writes `model_options()` to `zoo/model_options.json`, what `check_model_keys_early`
    reads: run it after a model is registered or gains an option."""
    path = os.path.join(config_dir or ZOO_CONFIG_DIR, MODEL_OPTIONS_FILE)
    lines = [f"  {json.dumps(name)}: {json.dumps(keys)}"
             for name, keys in sorted(model_options().items())]
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    return path


def check_model_keys_early(config, config_dir=None):
    """`check_model_keys` from `zoo/model_options.json`, without Keras; a model the file
    does not list (newer than it) is left to the full check."""
    path = os.path.join(config_dir or ZOO_CONFIG_DIR, MODEL_OPTIONS_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        options = json.load(f)
    if config.model.name in options:
        check_model_keys(config.model.name, config.model.overrides, options[config.model.name])


def zoo_config_names(config_dir=None):
    """The models with a `zoo/<model>.yaml` (every registered model has one), sorted; empty
    when the directory is not there (an installed, not a checked-out, package)."""
    directory = config_dir or ZOO_CONFIG_DIR
    if not os.path.isdir(directory):
        return []
    return sorted(name[:-len(".yaml")] for name in os.listdir(directory)
                  if name.endswith(".yaml"))


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
