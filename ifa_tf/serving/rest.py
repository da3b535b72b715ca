"""TF Serving's REST API over a `ModelManager`, as an ASGI application.

    GET  /v1/models/<name>[/versions/<v> | /labels/<l>]            model status
    GET  /v1/models/<name>[/versions/<v> | /labels/<l>]/metadata   signature defs
    GET  <metrics path>                                             Prometheus metrics
    POST /v1/models/<name>[/versions/<v> | /labels/<l>]:predict    {"instances": [...]} (row)
                                                                   or {"inputs": {...}} (columnar)

Errors are `{"error": message}` with the HTTP status TF Serving uses for the status code.

This module holds what is TF Serving's: paths, JSON, status codes, and the limits on what a
body may cost. HTTP itself (framing, keep-alive, timeouts, connections) is uvicorn's, set up in
`ifa_tf.serving.http_server`. A body is read here: its bytes are bounded by
`max_request_bytes` (413) and reserved in the server's `ByteBudget` before they are read
(503 when it is full), its nesting depth is checked before it is parsed, and it is parsed and
answered on a worker thread, so the event loop only moves bytes.
"""

import asyncio
import base64
import json
import logging
import re
import time

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from ifa_tf import export
from ifa_tf.serving import errors, grpc_service, parsing
from ifa_tf.serving import metrics as metrics_lib
from ifa_tf.serving.model_manager import listed

_LOG = logging.getLogger("ifa_serve")
_BOOLEAN_TOKEN = re.compile(rb"\b(?:true|false)\b")
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$")


def handle_predict(manager, name, version, label, body, max_json_depth=0):
    """Answers a REST predict body (bytes); returns the JSON-ready response dict. A body
    nested deeper than `max_json_depth` (0: no limit) is refused before it is parsed."""
    parsing.check_json_depth(body, max_json_depth)
    try:
        payload = json.loads(body)
    except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise errors.invalid_argument(f"JSON Parse error: {error}") from error
    if not isinstance(payload, dict):
        raise errors.invalid_argument("JSON Value: the request body must be a JSON object")
    if ("instances" in payload) == ("inputs" in payload):
        raise errors.invalid_argument(
            "Missing 'inputs' or 'instances' key" if "instances" not in payload else
            "Can only have one of 'instances' or 'inputs' key in the request")
    servable = manager.resolve(name, version, label)
    signature = servable.signature(payload.get("signature_name"))
    row_format = "instances" in payload
    if row_format:
        columns = _columns_from_instances(payload["instances"], signature)
    else:
        columns = _columns_from_inputs(payload["inputs"], signature)
    signature.check_inputs(_declared(columns, signature), manager.limits)
    # NumPy reads `[1, false]` as the integers [1, 0], and makes `[1, "x" * 10000]` an array
    # of 10,000-character strings, one per element (1.6 GB for 200,000 elements of a 2,000
    # character string): look leaf by leaf for booleans and strings where numbers belong,
    # but only when the body spells `true` or `false`, or holds more quotes than its keys.
    # (`in` first: the regex alone took 2.5 ms of a 74 KB body, a tenth of its answer.)
    may_hold_booleans = ((b"true" in body or b"false" in body)
                         and _BOOLEAN_TOKEN.search(body) is not None)
    may_hold_strings = body.count(b'"') > 2 * _strings_expected(payload)
    inputs = {key: _to_array(value, key, signature, may_hold_booleans, may_hold_strings)
              for key, value in columns.items()}
    outputs = signature.run(inputs, (), manager.limits)
    if row_format:
        batch = next(iter(outputs.values())).shape[0] if outputs else 0
        rows = [{alias: _json_value(value[i]) for alias, value in outputs.items()}
                for i in range(batch)]
        if len(outputs) == 1:
            rows = [next(iter(row.values())) for row in rows]
        return {"predictions": rows}
    columns = {alias: _json_value(value) for alias, value in outputs.items()}
    return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}


def status_json(manager, name, version, label):
    if version is not None and version > export.MAX_VERSION:
        manager.status(name, version)  # no version is beyond int64: NOT_FOUND
    request = get_model_status_pb2.GetModelStatusRequest()
    _fill_model_spec(request.model_spec, name, version, label)
    response = grpc_service.get_model_status(manager, request)
    return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def metadata_json(manager, name, version, label):
    if version is not None and version > export.MAX_VERSION:
        manager.resolve(name, version)  # no version is beyond int64: NOT_FOUND
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    _fill_model_spec(request.model_spec, name, version, label)
    request.metadata_field.append(grpc_service.SIGNATURE_DEF_FIELD)
    response = grpc_service.get_model_metadata(manager, request)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[grpc_service.SIGNATURE_DEF_FIELD].Unpack(signature_map)
    return {
        "model_spec": json_format.MessageToDict(response.model_spec,
                                                preserving_proto_field_name=True,
                                                always_print_fields_with_no_presence=True),
        "metadata": {"signature_def": json_format.MessageToDict(
            signature_map, preserving_proto_field_name=True)},
    }


def _fill_model_spec(model_spec, name, version, label):
    model_spec.name = name
    if version is not None:
        model_spec.version.value = version
    elif label is not None:
        model_spec.version_label = label


def _declared(columns, signature):
    """`{name: (dtype, shape)}` of JSON columns for `Signature.check_inputs`: the signature's
    dtype (JSON numbers carry none; `_to_array` checks the values) and the shape of the nested
    lists, read without building an array."""
    return {key: (np.dtype(signature.inputs[key][0].as_numpy_dtype), _json_shape(value, key))
            for key, value in columns.items()}


def _json_shape(value, key):
    """The shape of nested JSON lists, refused when ragged; visits every list but no leaf."""
    shape = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level = [value]
    for depth, size in enumerate(shape):
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                raise errors.invalid_argument(
                    f"Input {key}: nested lists of unequal lengths (expected {size} "
                    f"elements at depth {depth}, the length of the first list there)")
        if depth + 1 < len(shape):
            level = [child for item in level for child in item]
    return tuple(shape)


def _to_array(value, key, signature, may_hold_booleans=True, may_hold_strings=True):
    """A JSON column as an array of its input's dtype (call it once `_declared` passed the
    limits). An integer outside the dtype's range is refused, not wrapped; `true` and
    `false` are refused where a number belongs (NumPy would read them as 1 and 0), and so is
    a string, before NumPy pads every element to its width."""
    dtype, _ = signature.inputs[key]
    if dtype.name == "string":
        return _string_array(value, key)
    booleans = may_hold_booleans and not dtype.is_bool
    if booleans or may_hold_strings:
        leaf = _not_a_number(value, booleans)
        if leaf is not None:
            text = json.dumps(leaf)
            raise errors.invalid_argument(
                f"Input {key} expects {dtype.name} values; received "
                f"{text if len(text) <= 32 else text[:29] + '...'}, not a number")
    try:
        array = np.asarray(value)
    except ValueError as error:  # a list where a number belongs (NumPy 2 refuses it)
        raise errors.invalid_argument(f"Input {key}: nested lists of unequal lengths "
                                      f"({error})") from error
    if array.size and dtype.is_integer:
        bounds = np.iinfo(dtype.as_numpy_dtype)
        # NumPy infers uint64, float64 or object for integers beyond int64: look for the value.
        if array.dtype.kind not in "iu" or array.min() < bounds.min or array.max() > bounds.max:
            raise errors.invalid_argument(
                f"Input {key} expects {dtype.name} values; received "
                f"{_first_outside(value, bounds)}")
    if array.size and dtype.is_floating and array.dtype.kind not in "iuf":
        raise errors.invalid_argument(f"Input {key} expects {dtype.name} values")
    return array.astype(dtype.as_numpy_dtype)


def _not_a_number(value, booleans):
    """The first string that nested lists hold, or boolean with `booleans`; None if none."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, str) or (booleans and isinstance(item, bool)):
            return item
    return None


def _strings_expected(payload):
    """How many JSON strings a body of no string values spells: its objects' keys (the top
    level, `inputs`, each instance) and the signature name."""
    count = len(payload) + isinstance(payload.get("signature_name"), str)
    for key in ("inputs", "instances"):
        value = payload.get(key)
        if isinstance(value, dict):
            count += len(value)
        elif isinstance(value, list):
            count += sum(len(item) for item in value if isinstance(item, dict))
    return count


def _string_array(value, key):
    """A JSON column of a string input: JSON strings (UTF-8) or TF Serving's `{"b64": ...}`
    objects for bytes, as an object array of bytes."""
    def leaf(item):
        if isinstance(item, str):
            return item.encode("utf-8")
        if isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
            try:
                return base64.b64decode(item["b64"], validate=True)
            except ValueError as error:
                raise errors.invalid_argument(f"Input {key}: bad base64 in {{\"b64\": ...}}: "
                                              f"{error}") from error
        text = json.dumps(item)
        raise errors.invalid_argument(
            f"Input {key} expects string values (JSON strings, or {{\"b64\": ...}} for "
            f"bytes); received {text if len(text) <= 32 else text[:29] + '...'}")

    def convert(item):
        return [convert(child) for child in item] if isinstance(item, list) else leaf(item)

    shape = _json_shape(value, key)
    array = np.empty(shape, dtype=object)
    flat = convert(value)
    for _ in range(len(shape) - 1):
        flat = [child for item in flat for child in item]
    array.reshape(-1)[:] = flat if shape else [flat]
    return array


def _json_value(value):
    """An output array as JSON-ready lists; strings as text, or `{"b64": ...}` where they
    are not UTF-8 (as TF Serving writes bytes)."""
    if value.dtype != object:
        return value.tolist()

    def text(item):
        if not isinstance(item, bytes):
            return item
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(item).decode("ascii")}

    return np.vectorize(text, otypes=[object])(value).tolist() if value.size else value.tolist()


def _first_outside(value, bounds):
    """Describes the first leaf of nested lists that is not an integer within `bounds`."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, int):
            text = json.dumps(item)
            return f"{text if len(text) <= 32 else text[:29] + '...'}, not an integer"
        elif not bounds.min <= item <= bounds.max:
            return f"{item}, outside the range [{bounds.min}, {bounds.max}]"


def _columns_from_inputs(inputs, signature):
    if not isinstance(inputs, dict):
        if len(signature.inputs) != 1:
            raise errors.invalid_argument(
                "'inputs' must be a JSON object keyed by input name when the signature has "
                f"{len(signature.inputs)} inputs")
        inputs = {next(iter(signature.inputs)): inputs}
    unknown = sorted(set(inputs) - set(signature.inputs))
    if unknown:
        raise errors.invalid_argument(
            f"input size does not match signature: {len(inputs)}!={len(signature.inputs)} "
            f"Sent extra: {{{listed(unknown)}}}.")
    return inputs


def _columns_from_instances(instances, signature):
    if not isinstance(instances, list) or not instances:
        raise errors.invalid_argument("'instances' must be a non-empty JSON list")
    if not all(isinstance(instance, dict) for instance in instances):
        if len(signature.inputs) != 1:
            raise errors.invalid_argument(
                "Each instance must be a JSON object keyed by input name when the signature "
                f"has {len(signature.inputs)} inputs")
        instances = [{next(iter(signature.inputs)): instance} for instance in instances]
    keys = set(instances[0])
    for index, instance in enumerate(instances):
        if set(instance) != keys:
            raise errors.invalid_argument(
                f"Failed to process element: {index} of 'instances' list. Error: its keys "
                f"{sorted(instance)} differ from those of element 0 {sorted(keys)}")
    unknown = sorted(keys - set(signature.inputs))
    if unknown:
        raise errors.invalid_argument(
            f"input size does not match signature: {len(keys)}!={len(signature.inputs)} "
            f"Sent extra: {{{listed(unknown)}}}.")
    return {key: [instance[key] for instance in instances] for key in keys}


class RestApp:
    """TF Serving's REST API as an ASGI application (uvicorn serves it: `http_server`).

    `executor` runs the parsing and the model, `budget` is the server's `ByteBudget`,
    `max_request_bytes` bounds one body (0: no limit), `metrics` (with `metrics_path`) count
    and time predict calls, `max_json_depth` bounds a body's nesting (0: no limit).
    """

    def __init__(self, manager, executor, budget, max_request_bytes=0, metrics=None,
                 metrics_path=None, max_json_depth=0):
        self.manager = manager
        self.executor = executor
        self.budget = budget
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.max_json_depth = max_json_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan is off, and no WebSocket is served
            return
        reserved = [0]  # body bytes reserved in the budget, released once answered
        try:
            try:
                body = await self._read_body(scope, receive, reserved)
            except errors.ServingError as error:
                # The rest of the body is unread: the connection cannot carry another request.
                await _reply(send, *_error_answer(error), close=True)
                return
            if body is None:
                return  # the client left, or the transport answered it (a timeout)
            status, data, content_type = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.answer, scope["method"], _target(scope), body)
            await _reply(send, status, data, content_type)
        finally:
            self.budget.release(reserved[0])

    async def _read_body(self, scope, receive, reserved):
        """The request body (None when the client left first), bounded by
        `max_request_bytes` and reserved in the budget chunk by chunk, a declared
        `Content-Length` at once, before it is read. uvicorn has decoded the framing."""
        length = _content_length(scope["headers"])
        if length is not None:
            self._check_size(length)
            self._reserve(length, reserved)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk and length is None:
                self._check_size(len(body) + len(chunk))
                self._reserve(len(chunk), reserved)
            body += chunk
            if not message.get("more_body", False):
                return body

    def _check_size(self, length):
        if self.max_request_bytes and length > self.max_request_bytes:
            raise errors.ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Request body of {length} bytes exceeds this server's limit "
                f"--max_request_bytes={self.max_request_bytes}")

    def _reserve(self, size, reserved):
        self.budget.reserve(size)
        reserved[0] += size

    def answer(self, method, target, body):
        """`(HTTP status, body bytes, content type)` of a request (on a worker thread)."""
        try:
            path = target.split("?", 1)[0]
            if method == "GET" and self.metrics_path and path == self.metrics_path:
                return 200, self.metrics.render().encode(), metrics_lib.CONTENT_TYPE
            match = _PATH.match(path)
            if match is None:
                raise errors.invalid_argument(f"Malformed request: {method} {target}")
            name, label = match["name"], match["label"]
            version = int(match["version"]) if match["version"] else None
            if method == "GET" and match["verb"] is None:
                result = (metadata_json if match["metadata"] else status_json)(
                    self.manager, name, version, label)
            elif method == "POST" and match["verb"] == "predict" and not match["metadata"]:
                result = self._timed_predict(name, version, label, body)
            elif method == "POST" and match["verb"] in ("classify", "regress"):
                raise errors.ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                          f"{match['verb']} is not served by ifa-serve")
            else:
                raise errors.invalid_argument(f"Malformed request: {method} {target}")
            return 200, json.dumps(result).encode(), _JSON
        except errors.ServingError as error:
            return _error_answer(error)
        except Exception as error:  # answer something rather than drop the connection
            _LOG.exception("Unexpected error answering %s %s", method, target)
            return 500, json.dumps({"error": f"{type(error).__name__}: {error}"}).encode(), _JSON

    def _timed_predict(self, name, version, label, body):
        began = time.perf_counter()
        status = grpc.StatusCode.OK
        try:
            return handle_predict(self.manager, name, version, label, body,
                                  self.max_json_depth)
        except RecursionError as error:  # json.loads of a body nested deeper than the stack
            status = grpc.StatusCode.INVALID_ARGUMENT
            raise errors.invalid_argument(
                "JSON Parse error: the request body is nested too deeply") from error
        except errors.ServingError as error:
            status = error.code
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            raise
        finally:
            if self.metrics is not None:
                self.metrics.record(name, "Predict", "REST", status.name,
                                    time.perf_counter() - began)


_JSON = "application/json"


def _target(scope):
    """The request target as sent (path and query), for routing and messages."""
    target = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string")
    return (target + b"?" + query if query else target).decode("latin-1")


def _content_length(headers):
    """The declared body length, or None (chunked, or no body). uvicorn's parser refuses a
    malformed or repeated Content-Length, or one beside Transfer-Encoding."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _error_answer(error):
    """`(HTTP status, body, content type)` of a `ServingError`: TF Serving's status for its
    code, 413 for a body over the size limit."""
    status = (413 if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
              else errors.http_status(error.code))
    return status, json.dumps({"error": error.message}).encode(), _JSON


async def _reply(send, status, data, content_type, close=False):
    headers = [(b"content-type", content_type.encode()),
               (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
