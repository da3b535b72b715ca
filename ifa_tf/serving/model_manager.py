"""Loads, polls and hot-swaps SavedModel versions, following TF Serving's rules.

Each model has a base path whose all-digit subdirectories are versions (names beyond int64
are ignored with a warning, as TF Serving does). A version policy
(`latest` N, default 1; `all`; `specific` versions, as in TF Serving's `models.config`) picks
the versions to serve. Every `poll_wait_seconds` the base paths are listed again: a new
version is loaded (and warmed up with its `assets.extra/tf_serving_warmup_requests`) while the
old one keeps serving, then swapped in; the old one is dropped from the table, and requests
already holding it finish on it. A request without a version gets the highest available one.

A version that fails to load is retried `max_load_retries` times with back-off (one poll
interval, doubling, at most `load_retry_interval_seconds`), then left until its directory
changes. The failure is tied to the directory's content, not its number: a directory renamed
into its place, or files that were still arriving, get a fresh load once the directory holds
still for one poll.
"""

import dataclasses
import json
import logging
import math
import os
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from ifa_tf import export as export_lib
from ifa_tf import schema as schema_lib
from ifa_tf.data import log_converter
from ifa_tf.serving import errors

State = get_model_status_pb2.ModelVersionStatus.State
_LOG = logging.getLogger("ifa_serve")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model: its name, base path, version policy and labels.

    `policy` is `("latest", n)`, `("all",)` or `("specific", (v1, v2, ...))`.
    """

    name: str
    base_path: str
    policy: tuple = ("latest", 1)
    version_labels: dict = dataclasses.field(default_factory=dict)

    def select(self, versions):
        """The versions, among those on disk, that this policy serves."""
        kind = self.policy[0]
        if kind == "latest":
            return sorted(versions)[-self.policy[1]:] if versions else []
        if kind == "all":
            return sorted(versions)
        return sorted(v for v in versions if v in self.policy[1])


def read_model_config_file(path):
    """Parses a TF Serving `models.config` (text `ModelServerConfig`) into `ModelConfig`s."""
    with open(path) as f:
        text = f.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ValueError(f"Invalid model config file {path}: {error}") from error
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{path} must hold a model_config_list.")
    models = []
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ValueError(f"Every model in {path} needs a name and a base_path. "
                             f"Received: {text_format.MessageToString(model, as_one_line=True)}")
        if model.model_platform and model.model_platform != "tensorflow":
            raise ValueError(f"Model {model.name!r}: only model_platform \"tensorflow\" is "
                             f"served. Received: {model.model_platform!r}")
        policy_kind = model.model_version_policy.WhichOneof("policy_choice")
        if policy_kind == "all":
            policy = ("all",)
        elif policy_kind == "specific":
            policy = ("specific", tuple(model.model_version_policy.specific.versions))
        else:
            policy = ("latest", model.model_version_policy.latest.num_versions or 1)
        base_path = model.base_path
        if not os.path.isabs(base_path):
            base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base_path)
        models.append(ModelConfig(model.name, base_path, policy, dict(model.version_labels)))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{path} names a model twice: {names}")
    return models


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits; 0 means unlimited.

    `max_batch_size`, `max_candidates` and `max_sequence_length` bound B, m and n one by one.
    `max_total_candidates` bounds B·m and `max_total_sequence_length` B·n, what one request
    holds over all its users; a user with m = 0 (n = 0) counts as one. Each user also costs a
    fixed amount beside its m and n, so only all of them together, `max_batch_size`
    included, keep every request shape's memory bounded (`ifa-serve` sets all by default).
    An input that is none of `user_*`
    [B], `cand_*` [B, m], `seq_*` [B, n] (an ifa_tf export has none) may hold at most the
    larger of the two totals.
    """

    max_batch_size: int = 0
    max_candidates: int = 0
    max_sequence_length: int = 0
    max_total_candidates: int = 0
    max_total_sequence_length: int = 0


class Signature:
    """One signature of a loaded version: input checks and execution."""

    def __init__(self, name, function, signature_def, servable=""):
        self.name = name
        self.function = function
        self.signature_def = signature_def
        self.servable = servable  # "model ifa version 3", for messages
        self.inputs = {key: (tf.dtypes.as_dtype(info.dtype),
                             None if info.tensor_shape.unknown_rank
                             else len(info.tensor_shape.dim))
                       for key, info in signature_def.inputs.items()}
        self.outputs = sorted(signature_def.outputs)
        # {input: the most bytes one of its strings may hold}: an ifa_tf export's raw ids.
        self.string_limits = {}

    def run(self, inputs, output_filter=(), limits=Limits()):
        """Checks `inputs` (name -> np.ndarray) and runs; returns name -> np.ndarray."""
        self.check_inputs({k: (v.dtype, v.shape) for k, v in inputs.items()}, limits)
        self.check_string_lengths(inputs)
        wanted = list(output_filter) or self.outputs
        for alias in wanted:
            if alias not in self.outputs:
                raise errors.invalid_argument(
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{','.join(self.outputs)}}}.")
        if len(set(wanted)) != len(wanted):
            raise errors.invalid_argument(
                f"duplicate output tensor alias: {sorted(wanted)}")
        try:
            outputs = self.function(**{k: tf.constant(v) for k, v in inputs.items()})
        except tf.errors.OpError as error:
            raise errors.ServingError(errors.code_for_value(error.error_code),
                                      _op_error_message(error)) from error
        result = {alias: outputs[alias].numpy() for alias in wanted}
        self._check_finite(result)
        return result

    def check_string_lengths(self, inputs):
        """INVALID_ARGUMENT naming the input when a string of `string_limits`' inputs is
        longer than its limit: checked before the graph, whose raw id mapping costs time in
        proportion to the ids' bytes (the graph checks it too, as TF Serving runs it)."""
        for key, limit in sorted(self.string_limits.items()):
            value = inputs.get(key)
            if value is None or value.dtype != object or not value.size:
                continue
            lengths = np.fromiter(map(len, value.flat), np.int64, value.size)
            longest = int(lengths.argmax())
            if lengths[longest] > limit:
                position = ", ".join(map(str, np.unravel_index(longest, value.shape)))
                raise errors.invalid_argument(
                    f"Input {key}: a raw id of {lengths[longest]} bytes at [{position}], "
                    f"over the limit of {limit} bytes per raw id")

    def _check_finite(self, outputs):
        """INTERNAL when a float output holds NaN or infinity: a diverged or broken model must
        not answer OK with scores no ranking can use."""
        for alias, value in sorted(outputs.items()):
            if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                raise errors.ServingError(
                    grpc.StatusCode.INTERNAL,
                    f"{self.servable or 'The model'} computed non-finite values: output "
                    f"{alias} holds {bad} NaN or infinite values of {np.size(value)} "
                    f"(signature {self.name}). The model is broken (e.g. diverged in "
                    "training); serve another version.")

    def check_inputs(self, declared, limits):
        """Checks a request's inputs as it declares them, `{name: (NumPy dtype, shape)}`, so
        that both protocols can refuse one before materialising anything: names, dtypes,
        ranks, and the B / m / n limits (INVALID_ARGUMENT)."""
        sent, required = set(declared), set(self.inputs)
        if sent != required:
            raise errors.invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(required)} "
                f"len({{{listed(sent)}}}) != len({{{listed(required)}}}). "
                f"Sent extra: {{{listed(sent - required)}}}. "
                f"Missing but required: {{{listed(required - sent)}}}.")
        for index, key in enumerate(sorted(self.inputs)):
            dtype, rank = self.inputs[key]
            sent_dtype, shape = declared[key]
            if sent_dtype != dtype.as_numpy_dtype:
                raise errors.invalid_argument(
                    f"Expects arg[{index}] ({key}) to be {_type_name(dtype)} but "
                    f"{_type_name(sent_dtype)} is provided")
            if rank is not None and len(shape) != rank:
                raise errors.invalid_argument(
                    f"Input {key} must have rank {rank}; received shape {list(shape)}")
        _check_dimensions({key: shape for key, (_, shape) in declared.items()}, limits)


def listed(names, most=10, longest=64):
    """Names sorted and joined by commas as TF Serving lists inputs, at most `most` of them,
    each cut to `longest` characters: they come from the client and go back to it."""
    names = sorted(names)
    shown = [name if len(name) <= longest else name[:longest] + "..." for name in names[:most]]
    if len(names) > most:
        shown.append(f"... {len(names) - most} more")
    return ",".join(shown)


def _check_dimensions(shapes, limits):
    """One batch size B, one m, one n, each within its limit, and B·m, B·n within theirs
    (INVALID_ARGUMENT naming the input or the limit). `shapes`: name -> dims, all >= 0."""
    caps = {"batch size": ("max_batch_size", limits.max_batch_size),
            "candidate count m": ("max_candidates", limits.max_candidates),
            "sequence length n": ("max_sequence_length", limits.max_sequence_length)}
    axes = {axis: {} for axis in caps}
    for key, shape in sorted(shapes.items()):
        named = _named_axes(key, shape)
        for axis, size in named.items():
            flag, cap = caps[axis]
            if cap and size > cap:
                raise errors.invalid_argument(
                    f"Input {key}: {axis} {size} exceeds this server's limit --{flag}={cap}.")
            axes[axis][key] = size
        if len(shape) > len(named):
            _check_unnamed_input(key, shape, limits)
    for axis, sizes in axes.items():
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{k}={v}" for k, v in sorted(sizes.items()))
            raise errors.invalid_argument(
                f"Inconsistent {axis} across inputs: {listed}; all must agree.")
    batch = next(iter(axes["batch size"].values()), 0)
    for axis, letter, noun, flag, cap in (
            ("candidate count m", "m", "candidates", "max_total_candidates",
             limits.max_total_candidates),
            ("sequence length n", "n", "sequence events", "max_total_sequence_length",
             limits.max_total_sequence_length)):
        size = next(iter(axes[axis].values()), 0)
        total = batch * max(size, 1)
        if cap and total > cap:
            raise errors.invalid_argument(
                f"Request of batch size {batch} and {axis} {size} holds B·max({letter}, 1) = "
                f"{total} {noun}, over this server's limit --{flag}={cap}.")


def _named_axes(key, shape):
    """`{axis: size}` of an input's B, m and n axes: dim 0 is B, dim 1 of a rank-2 `cand_*`
    input m and of a `seq_*` input n."""
    named = {"batch size": shape[0]} if shape else {}
    if len(shape) == 2 and key.startswith(schema_lib.CANDIDATE_PREFIX):
        named["candidate count m"] = shape[1]
    if len(shape) == 2 and key.startswith(schema_lib.SEQUENCE_PREFIX):
        named["sequence length n"] = shape[1]
    return named


def _check_unnamed_input(key, shape, limits):
    """Bounds an input with axes besides B, m and n by its size alone, so that the totals
    bound every signature's memory, not only an ifa_tf export's."""
    cap = max(limits.max_total_candidates, limits.max_total_sequence_length)
    size = math.prod(shape)
    if cap and size > cap:
        raise errors.invalid_argument(
            f"Input {key} of shape {list(shape)} holds {size} values, over this server's limit "
            f"of {cap} per input (the larger of --max_total_candidates and "
            f"--max_total_sequence_length).")


def _type_name(dtype):
    """TensorFlow's C++ name of a dtype (`float`, `int64`), as its error messages use."""
    try:
        enum = tf.dtypes.as_dtype(dtype).as_datatype_enum
    except TypeError:
        return str(dtype)
    return types_pb2.DataType.Name(enum)[len("DT_"):].lower()


def _op_error_message(error):
    """The useful line of a TF runtime error: drops the Python side's 'Graph execution'
    framing and the graph context TensorFlow appends (`[[{{node ...}}]]`, `[Op:...]`)."""
    message = error.message
    marker = message.find("assertion failed:")
    if marker >= 0:
        message = message[marker:]
    for context in ("\n\t [[", " [Op:"):
        message = message.split(context)[0]
    return message.strip()


class Servable:
    """One loaded version of one model."""

    def __init__(self, name, version, path):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = tf.saved_model.load(path, tags=["serve"])
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        meta_graph = next((g for g in saved_model.meta_graphs
                           if "serve" in g.meta_info_def.tags), saved_model.meta_graphs[0])
        self.signature_defs = meta_graph.signature_def
        self.signatures = {
            key: Signature(key, self.loaded.signatures[key], self.signature_defs[key],
                           f"Model {name} version {version}")
            for key in self.loaded.signatures}
        self.metadata = export_lib.read_metadata(path)
        raw = self.signatures.get(export_lib.RAW_SIGNATURE_NAME)
        if raw is not None and self.metadata:
            # An export from before the limit was recorded maps ids of any length: the
            # converter's limit bounds its cost too.
            limit = self.metadata.get("raw_id_max_bytes", log_converter.MAX_ID_BYTES)
            raw.string_limits = {name: limit for name in self.metadata.get("raw_id_inputs", ())
                                 if name in raw.inputs}

    def signature(self, name):
        if name is not None and not isinstance(name, str):
            raise errors.invalid_argument(
                f"signature_name must be a string. Received: {json.dumps(name)[:100]}")
        name = name or export_lib.SIGNATURE_NAME
        if name not in self.signatures:
            raise errors.signature_not_found(name)
        return self.signatures[name]

    def warm_up(self):
        """Replays the version's recorded warm-up requests, as TF Serving does on load."""
        requests = export_lib.read_warmup_requests(self.path)
        for request in requests:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            self.signature(request.model_spec.signature_name).run(
                inputs, request.output_filter)
        return len(requests)


@dataclasses.dataclass(frozen=True)
class _LoadFailure:
    """Why a version is not loaded: the directory content that failed, and when to retry.

    `failed_loads` is 0 when the content changed after the last failure and was not tried yet.
    """

    fingerprint: tuple
    failed_loads: int
    retry_at: float


def _fingerprint(path):
    """The identity of a version directory's content: the directory's inode and each file's
    path, inode, size and modification time. A directory renamed into place, or a file still
    being copied, changes it."""
    try:
        root = os.stat(path)
    except OSError:
        return None
    files = []
    for directory, subdirectories, names in os.walk(path):
        subdirectories.sort()
        for name in sorted(names):
            file_path = os.path.join(directory, name)
            try:
                stat = os.stat(file_path)
            except OSError:  # removed while listed: the next poll sees what replaced it
                continue
            files.append((os.path.relpath(file_path, path), stat.st_ino, stat.st_size,
                          stat.st_mtime_ns))
    return root.st_dev, root.st_ino, tuple(files)


class ModelManager:
    """Serves the configured models' versions; polls base paths for new and removed ones."""

    def __init__(self, configs, poll_wait_seconds=1.0, max_load_retries=5, limits=Limits(),
                 load_retry_interval_seconds=60.0):
        self.configs = {c.name: c for c in configs}
        self.poll_wait_seconds = poll_wait_seconds
        self.max_load_retries = max_load_retries
        self.load_retry_interval_seconds = load_retry_interval_seconds
        self.limits = limits
        self._lock = threading.Lock()
        self._servables = {name: {} for name in self.configs}  # name -> {version: Servable}
        self._states = {name: {} for name in self.configs}  # name -> {version: (state, msg)}
        self._failures = {}  # (name, version) -> _LoadFailure; touched by the poll only
        self._ignored = {name: {} for name in self.configs}  # name -> {dir name: why}
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------------ lifecycle
    def start(self):
        """Loads what is on disk now, then polls in the background (unless the wait is 0)."""
        self.poll()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="ifa-serve-poll",
                                            daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:  # a bad poll must not kill the server; the next one retries
                _LOG.exception("File system poll failed")

    def poll(self):
        """One pass: load aspired versions not loaded yet (or due a retry), unload the rest."""
        for name, config in self.configs.items():
            on_disk = self._versions_on_disk(config)
            if not on_disk:
                _LOG.warning("No versions of servable %s found under base path %s",
                             name, config.base_path)
            aspired = config.select(on_disk)
            for key in [key for key in self._failures if key[0] == name
                        and key[1] not in aspired]:
                del self._failures[key]  # gone or no longer wanted: a later return is new
            for version in aspired:
                if (version not in self._servables[name]
                        and self._load_due(name, version, on_disk[version])):
                    self._load(config, version, on_disk[version])
            with self._lock:
                loaded_aspired = [v for v in aspired if v in self._servables[name]]
                # Keep serving the old versions while none of the aspired ones loaded.
                if loaded_aspired:
                    for version in list(self._servables[name]):
                        if version not in aspired:
                            del self._servables[name][version]
                            self._states[name][version] = (State.END, "")
                            _LOG.info("Unloaded servable version {name: %s version: %d}",
                                      name, version)

    def _versions_on_disk(self, config):
        """`{version: path}` under the base path; warns once about each ignored name."""
        versions, ignored = export_lib.version_directories(config.base_path)
        for directory in sorted(ignored.keys() - self._ignored[config.name].keys()):
            _LOG.warning("Ignoring directory %s under base path %s of servable %s: %s",
                         directory, config.base_path, config.name, ignored[directory])
        self._ignored[config.name] = ignored
        return {version: os.path.join(config.base_path, directory)
                for version, directory in versions.items()}

    def _load_due(self, name, version, path):
        """Whether to load a version now: never tried, or its failed content is due a retry,
        or its directory changed since the failure and then held still for one poll."""
        failure = self._failures.get((name, version))
        if failure is None:
            return True
        fingerprint = _fingerprint(path)
        if fingerprint != failure.fingerprint:
            if failure.failed_loads:
                _LOG.info("Version %d of servable %s changed on disk since its failed load; "
                          "loading it again once it holds still", version, name)
            self._failures[(name, version)] = _LoadFailure(fingerprint, 0, 0.0)
            return False
        return (failure.failed_loads <= self.max_load_retries
                and time.monotonic() >= failure.retry_at)

    def _record_failure(self, name, version, fingerprint):
        key = (name, version)
        previous = self._failures.get(key)
        failed_loads = 1
        if previous is not None and previous.fingerprint == fingerprint:
            failed_loads = previous.failed_loads + 1
        # Retry k waits a poll interval * 2**(k - 1), at most load_retry_interval (TF Serving's
        # fixed wait): a passing failure is retried soon, a lasting one ever more rarely. The
        # exponent's clamp only keeps the product a finite float.
        wait = min(self.poll_wait_seconds * 2.0 ** min(failed_loads - 1, 64),
                   self.load_retry_interval_seconds)
        self._failures[key] = _LoadFailure(fingerprint, failed_loads, time.monotonic() + wait)
        if failed_loads <= self.max_load_retries:
            return f"retry {failed_loads} of {self.max_load_retries} in {wait:g}s"
        return "no retries left; it is tried again when its directory changes"

    def _load(self, config, version, path):
        with self._lock:
            self._states[config.name][version] = (State.LOADING, "")
        # Taken before the load, so a file that changes during it makes the next poll retry.
        fingerprint = _fingerprint(path)
        start = time.monotonic()
        try:
            servable = Servable(config.name, version, path)
            warmed = servable.warm_up()
        except Exception as error:  # any load failure is reported in the version's status
            message = f"Failed to load servable version {version} of {config.name}: {error}"
            _LOG.error("%s (%s)", message,
                       self._record_failure(config.name, version, fingerprint))
            with self._lock:
                self._states[config.name][version] = (State.END, message)
            return
        self._failures.pop((config.name, version), None)
        with self._lock:
            self._servables[config.name][version] = servable
            self._states[config.name][version] = (State.AVAILABLE, "")
        _LOG.info("Successfully loaded servable version {name: %s version: %d} in %.2fs "
                  "(%d warm-up requests)", config.name, version, time.monotonic() - start,
                  warmed)

    # -------------------------------------------------------------------------- lookups
    def resolve(self, name, version=None, label=None):
        """The `Servable` a model spec asks for, or TF Serving's error."""
        if name not in self.configs:
            raise errors.servable_not_found(name, version)
        if label:
            version = self.version_for_label(name, label)
        with self._lock:
            servables = self._servables[name]
            if version is None:
                if not servables:
                    raise errors.servable_not_found(name)
                return servables[max(servables)]
            if version not in servables:
                raise errors.servable_not_found(name, version)
            return servables[version]

    def status(self, name, version=None):
        """`[(version, state, error_message)]` of a model, as GetModelStatus reports them."""
        if name not in self.configs:
            raise errors.ServingError(grpc.StatusCode.NOT_FOUND,
                                      f"Could not find any versions of model {name}")
        with self._lock:
            states = dict(self._states[name])
        if version is not None:
            if version not in states:
                raise errors.ServingError(grpc.StatusCode.NOT_FOUND,
                                          f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise errors.ServingError(grpc.StatusCode.NOT_FOUND,
                                      f"Could not find any versions of model {name}")
        return [(v, s, m) for v, (s, m) in sorted(states.items())]

    def version_for_label(self, name, label):
        labels = self.configs[name].version_labels if name in self.configs else {}
        if label not in labels:
            raise errors.unknown_version_label(label)
        return labels[label]


# The TensorProto field that carries each dtype's values, and how many make one element
# (tensor.proto).
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", 1), types_pb2.DT_DOUBLE: ("double_val", 1),
    types_pb2.DT_HALF: ("half_val", 1), types_pb2.DT_BFLOAT16: ("half_val", 1),
    types_pb2.DT_INT8: ("int_val", 1), types_pb2.DT_INT16: ("int_val", 1),
    types_pb2.DT_INT32: ("int_val", 1), types_pb2.DT_UINT8: ("int_val", 1),
    types_pb2.DT_UINT16: ("int_val", 1), types_pb2.DT_INT64: ("int64_val", 1),
    types_pb2.DT_UINT32: ("uint32_val", 1), types_pb2.DT_UINT64: ("uint64_val", 1),
    types_pb2.DT_BOOL: ("bool_val", 1), types_pb2.DT_STRING: ("string_val", 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", 2), types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
}


def tensor_proto_spec(tensor_proto, key):
    """`(NumPy dtype, shape)` a request `TensorProto` declares, checked against the values it
    carries without reading them (INVALID_ARGUMENT naming the input otherwise): a known dtype
    and rank, dims >= 0, and as many values as elements, in `tensor_content` or the dtype's
    `*_val` field, or one value that fills the tensor (TF Serving's broadcast). The shape
    still needs `Signature.check_inputs` before `to_ndarray` may materialise it."""
    shape = tuple(dim.size for dim in tensor_proto.tensor_shape.dim)
    field = _VALUE_FIELDS.get(tensor_proto.dtype)
    if field is None:
        known = tensor_proto.dtype in types_pb2.DataType.values()
        raise errors.invalid_argument(
            f"Input {key}: malformed TensorProto: dtype "
            f"{types_pb2.DataType.Name(tensor_proto.dtype) if known else tensor_proto.dtype} "
            f"cannot be sent in a request")
    if tensor_proto.tensor_shape.unknown_rank:
        raise errors.invalid_argument(f"Input {key}: malformed TensorProto: unknown rank")
    negative = [index for index, size in enumerate(shape) if size < 0]
    if negative:
        raise errors.invalid_argument(
            f"Input {key}: malformed TensorProto: dimension {negative[0]} of tensor_shape "
            f"{list(shape)} is negative")
    dtype = tf.dtypes.as_dtype(tensor_proto.dtype)
    elements = math.prod(shape)
    if tensor_proto.tensor_content:
        expected = elements * dtype.size
        if len(tensor_proto.tensor_content) != expected:
            raise errors.invalid_argument(
                f"Input {key}: malformed TensorProto: tensor_shape {list(shape)} of "
                f"{_type_name(dtype)} needs {expected} bytes of tensor_content; received "
                f"{len(tensor_proto.tensor_content)}")
        return np.dtype(dtype.as_numpy_dtype), shape
    name, per_element = field
    values = len(getattr(tensor_proto, name)) // per_element
    if values != elements and not (values == 1 and elements > 0):
        raise errors.invalid_argument(
            f"Input {key}: malformed TensorProto: tensor_shape {list(shape)} holds {elements} "
            f"values but {values} were sent in {name} (send all of them, or one to fill the "
            f"tensor)")
    return np.dtype(dtype.as_numpy_dtype), shape


def to_ndarray(tensor_proto, key):
    """A request `TensorProto` as NumPy, INVALID_ARGUMENT when it is malformed. It
    materialises every declared element: check `tensor_proto_spec`'s shape first."""
    try:
        return np.asarray(tf.make_ndarray(tensor_proto))
    except Exception as error:  # make_ndarray raises several types for malformed protos
        raise errors.invalid_argument(f"Input {key}: malformed TensorProto ({error})") from error
