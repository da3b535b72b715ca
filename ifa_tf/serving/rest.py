"""TF Serving's REST API over a `ModelManager` (stdlib HTTP server, a thread per connection).

    GET  /v1/models/<name>[/versions/<v> | /labels/<l>]            model status
    GET  /v1/models/<name>[/versions/<v> | /labels/<l>]/metadata   signature defs
    GET  <metrics path>                                             Prometheus metrics
    POST /v1/models/<name>[/versions/<v> | /labels/<l>]:predict    {"instances": [...]} (row)
                                                                   or {"inputs": {...}} (columnar)

Errors are `{"error": message}` with the HTTP status TF Serving uses for the status code.

Transport: bodies come with `Content-Length` or `Transfer-Encoding: chunked`, both bounded by
`max_request_bytes`; a connection that sends nothing for `read_timeout_seconds` (idle between
requests, or stalled inside one) is closed; a request counts as in flight, the work that
shutdown waits for, only once its body has been read.

What the server holds at once is bounded: at most `max_connections` connections (and so
handler threads; one more is answered 503 and closed), at most `max_body_bytes_in_flight`
bytes of request bodies being received or answered (a body that would pass it is answered
503 before it is read), and a request whose line, headers and body have not all arrived
`request_timeout_seconds` after its first byte is answered 408 and its connection closed,
however steadily it trickles in. Any other method than GET and POST, and any malformed
request line or header, is answered with a JSON error too.
"""

import base64
import http.server
import json
import logging
import re
import socket
import threading
import time

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from ifa_tf import export
from ifa_tf.serving import errors, grpc_service
from ifa_tf.serving.model_manager import listed

_LOG = logging.getLogger("ifa_serve")
_BOOLEAN_TOKEN = re.compile(rb"\b(?:true|false)\b")
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$")


def handle_predict(manager, name, version, label, body):
    """Answers a REST predict body (bytes); returns the JSON-ready response dict."""
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
    # NumPy reads `[1, false]` as the integers [1, 0]: look for booleans only when the body
    # spells one (a string may, too; the look is then exact, leaf by leaf).
    may_hold_booleans = _BOOLEAN_TOKEN.search(body) is not None
    inputs = {key: _to_array(value, key, signature, may_hold_booleans)
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


def _to_array(value, key, signature, may_hold_booleans=True):
    """A JSON column as an array of its input's dtype (call it once `_declared` passed the
    limits). An integer outside the dtype's range is refused, not wrapped; `true` and
    `false` are refused where a number belongs (NumPy would read them as 1 and 0)."""
    dtype, _ = signature.inputs[key]
    if dtype.name == "string":
        return _string_array(value, key)
    boolean = _a_boolean(value) if may_hold_booleans and not dtype.is_bool else None
    if boolean is not None:
        raise errors.invalid_argument(
            f"Input {key} expects {dtype.name} values; received {json.dumps(boolean)}, not a "
            "number")
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


def _a_boolean(value):
    """A `True` or `False` that nested lists hold, or None."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, bool):
            return item
    return None


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


class InFlight:
    """Counts requests being answered, so shutdown can wait for them."""

    def __init__(self):
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self):
        with self._idle:
            self._count += 1

    def __exit__(self, *exc_info):
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0,
                                       max(0.0, deadline - time.monotonic()))


# A chunk-size line is hex digits and optional extensions; nothing legitimate is this long.
_MAX_CHUNK_LINE = 4096
_MAX_TRAILER_LINES = 100
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Capacity:
    """What the server holds at once: open connections and bytes of request bodies, each
    under its cap (0: no cap)."""

    def __init__(self, max_connections=0, max_body_bytes=0):
        self.max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self.connections = 0
        self.body_bytes = 0

    def open_connection(self):
        with self._lock:
            if self.max_connections and self.connections >= self.max_connections:
                return False
            self.connections += 1
            return True

    def close_connection(self):
        with self._lock:
            self.connections -= 1

    def reserve(self, size):
        with self._lock:
            if self.max_body_bytes and self.body_bytes + size > self.max_body_bytes:
                return False
            self.body_bytes += size
            return True

    def release(self, size):
        with self._lock:
            self.body_bytes -= size


class _Deadlines:
    """Cuts off requests that take too long to arrive: `arm(handler, seconds)` starts the
    clock of a request, `disarm(handler)` stops it once its body has been read; a request
    still armed when its time is up has its connection's reading side shut down, which ends
    any read under way, and `handler.request_expired` set."""

    _TICK_SECONDS = 0.1

    def __init__(self):
        self._lock = threading.Lock()
        self._due = {}  # handler -> time.monotonic() deadline
        self._thread = None

    def arm(self, handler, seconds):
        with self._lock:
            self._due[handler] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="ifa-serve-rest-deadlines")
                self._thread.start()

    def disarm(self, handler):
        with self._lock:
            self._due.pop(handler, None)

    def _watch(self):
        while True:
            time.sleep(self._TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                expired = [handler for handler, due in self._due.items() if due <= now]
                for handler in expired:
                    del self._due[handler]
            for handler in expired:
                handler.request_expired = True
                try:
                    handler.connection.shutdown(socket.SHUT_RD)
                except OSError:  # the connection closed meanwhile
                    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's REST server
    # What a request line without a version (or cut short) is taken for: http.server's
    # HTTP/0.9 would answer it with a body and no status line or headers.
    default_request_version = "HTTP/1.1"
    server_version = "ifa-serve"
    manager = None  # set by make_rest_server
    max_request_bytes = 0
    request_timeout = None  # seconds for a request to arrive whole; None: no limit
    capacity = None
    deadlines = None
    in_flight = None
    metrics = None
    metrics_path = None
    timeout = None  # socket timeout (StreamRequestHandler applies it to every read and write)
    # The headers and the body go out in two writes; with Nagle's algorithm the second waits
    # for the client's delayed ACK of the first (40 ms on Linux) on a keep-alive connection.
    disable_nagle_algorithm = True
    request_expired = False

    def handle_one_request(self):
        # The idle timeout applies until a request's first byte arrives; from there the whole
        # request has `request_timeout` to arrive, so a trickle cannot hold the connection.
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle past the read timeout (TimeoutError), or reset
            self.close_connection = True
            return
        if self.request_timeout:
            self.deadlines.arm(self, self.request_timeout)
        try:
            super().handle_one_request()
        finally:
            self.deadlines.disarm(self)

    def __getattr__(self, name):
        # `do_<METHOD>` for every method: those other than GET and POST get TF Serving's
        # JSON "Malformed request" answer rather than http.server's HTML page.
        if name.startswith("do_"):
            return lambda: self._dispatch(name[len("do_"):])
        raise AttributeError(name)

    def _dispatch(self, method):
        reserved = [0]  # body bytes reserved in `capacity`, released once answered
        try:
            try:
                body = self._read_body(reserved)
            finally:
                self.deadlines.disarm(self)
            if self.request_expired:  # the body ended because its time was up
                raise ConnectionAbortedError("request deadline passed")
        except errors.ServingError as error:
            self.close_connection = True  # the rest of the body is unread: out of step
            self._reply_error(error)
            self.capacity.release(reserved[0])
            return
        except TimeoutError:
            self.close_connection = True
            self._reply(408, {"error": f"Request body not received: nothing arrived for "
                                       f"{self.timeout:g}s"})
            self.capacity.release(reserved[0])
            return
        except ConnectionError:
            self.close_connection = True
            self.capacity.release(reserved[0])
            if self.request_expired:
                self._reply_expired()
            return  # else the client left mid-body: nobody to answer
        # Counted only now: a client stalled mid-body is not work that shutdown must await.
        try:
            with self.in_flight:
                self._answer(method, body)
        finally:
            self.capacity.release(reserved[0])

    def _reply_expired(self):
        self._reply(408, {"error": f"Request not received in time: its line, headers and "
                                   f"body must arrive within {self.request_timeout:g}s of its "
                                   "first byte"})

    def send_error(self, code, message=None, explain=None):
        """http.server's answer to a malformed request line or header, as a JSON error."""
        self.close_connection = True
        if self.request_expired:
            self._reply_expired()
            return
        short, _ = self.responses.get(code, ("Error", ""))
        self._reply(code, {"error": errors.clip(f"Malformed request: {message or short}")})

    def _answer(self, method, body):
        try:
            path = self.path.split("?", 1)[0]
            if method == "GET" and self.metrics_path and path == self.metrics_path:
                self._reply_text(200, self.metrics.render())
                return
            match = _PATH.match(path)
            if match is None:
                raise errors.invalid_argument(f"Malformed request: {method} {self.path}")
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
                raise errors.invalid_argument(f"Malformed request: {method} {self.path}")
            self._reply(200, result)
        except errors.ServingError as error:
            self._reply_error(error)
        except Exception as error:  # answer something rather than drop the connection
            _LOG.exception("Unexpected error answering %s %s", method, self.path)
            self._reply(500, {"error": f"{type(error).__name__}: {error}"})

    def _timed_predict(self, name, version, label, body):
        began = time.perf_counter()
        status = grpc.StatusCode.OK
        try:
            return handle_predict(self.manager, name, version, label, body)
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

    # ------------------------------------------------------------------------- request body
    def _read_body(self, reserved):
        """The request body, from `Content-Length` or chunked transfer coding. Its bytes
        are reserved in the server's capacity before they are read, and added to
        `reserved[0]` for the caller to release.

        Raises `ServingError` for a malformed or oversized framing (the connection cannot be
        reused after it) or a body the server has no room for, `TimeoutError` for a stalled
        client, `ConnectionError` for one that left or whose request ran out of time.
        """
        encodings = self.headers.get_all("Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length")
        if encodings:
            if lengths:  # RFC 9112 6.1: a request smuggling vector; refuse rather than guess
                raise errors.invalid_argument(
                    "A request must not carry both Transfer-Encoding and Content-Length")
            coding = ",".join(encodings).strip().lower()
            if coding != "chunked":
                raise errors.ServingError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"Transfer-Encoding {coding!r} is not supported; send the body with "
                    "Content-Length or Transfer-Encoding: chunked")
            return self._read_chunked(reserved)
        if not lengths:
            return b""
        if len(set(lengths)) > 1:
            raise errors.invalid_argument(f"Conflicting Content-Length headers: {lengths}")
        value = lengths[0].strip()
        if not (value.isascii() and value.isdigit()):
            raise errors.invalid_argument(
                f"Invalid Content-Length header: {value[:40]!r}; expected a byte count")
        length = int(value)
        self._check_body_size(length)
        self._reserve(length, reserved)
        return self._read_exactly(length)

    def _read_chunked(self, reserved):
        body = bytearray()
        while True:
            size = self._chunk_size(self._read_line("chunk size line"))
            if size == 0:
                break
            self._check_body_size(len(body) + size)
            self._reserve(size, reserved)
            body += self._read_exactly(size)
            if self._read_line("chunk end").strip():
                raise errors.invalid_argument("Malformed chunked body: a chunk is longer "
                                              "than its declared size")
        for _ in range(_MAX_TRAILER_LINES):
            if not self._read_line("trailer line").strip():
                return bytes(body)
        raise errors.invalid_argument(
            f"Malformed chunked body: more than {_MAX_TRAILER_LINES} trailer lines")

    def _chunk_size(self, line):
        field = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(field):
            raise errors.invalid_argument(
                f"Malformed chunked body: invalid chunk size {field[:40]!r}")
        return int(field, 16)

    def _read_line(self, what):
        line = self.rfile.readline(_MAX_CHUNK_LINE + 1)
        if not line.endswith(b"\n"):
            if len(line) > _MAX_CHUNK_LINE:
                raise errors.invalid_argument(
                    f"Malformed chunked body: {what} longer than {_MAX_CHUNK_LINE} bytes")
            raise ConnectionAbortedError(f"connection closed inside the {what}")
        return line

    def _read_exactly(self, length):
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise ConnectionAbortedError(f"connection closed after {len(data)} of {length} "
                                         "body bytes")
        return data

    def _reserve(self, size, reserved):
        if not self.capacity.reserve(size):
            raise errors.ServingError(
                grpc.StatusCode.UNAVAILABLE,
                f"Server busy: a request body of {size} more bytes would pass this server's "
                f"limit on bodies in flight, --rest_max_body_bytes_in_flight="
                f"{self.capacity.max_body_bytes}; retry later")
        reserved[0] += size

    def _check_body_size(self, length):
        if self.max_request_bytes and length > self.max_request_bytes:
            raise errors.ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Request body of {length} bytes exceeds this server's limit "
                f"--max_request_bytes={self.max_request_bytes}")

    # ----------------------------------------------------------------------------- response
    def _reply_error(self, error):
        self._reply(413 if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    else errors.http_status(error.code), {"error": error.message})

    def _reply(self, status, payload):
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _reply_text(self, status, text):
        self._send(status, text.encode(), "text/plain; version=0.0.4")

    def _send(self, status, body, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError as error:  # the client left, or stopped reading past the timeout
            self.close_connection = True
            _LOG.debug("Could not send the answer to %s: %s", self.address_string(), error)

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        _LOG.debug("%s - %s", self.address_string(), format % args)


class _RestServer(http.server.ThreadingHTTPServer):
    # Handler threads are daemons because idle keep-alive connections hold theirs until the
    # read timeout; shutdown waits on the in-flight count instead of on the threads.
    daemon_threads = True
    # The stdlib's backlog of 5 drops (and the client retries after 1 s) a burst of new
    # connections that arrives faster than the accept loop; the kernel caps this at somaxconn.
    request_queue_size = socket.SOMAXCONN
    capacity = None

    def process_request(self, request, client_address):
        if not self.capacity.open_connection():
            _refuse_connection(request, self.capacity.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the connection is closed here
            self.capacity.close_connection()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.capacity.close_connection()


def _refuse_connection(sock, max_connections):
    """Answers a connection over the cap with 503 and closes it, from the accept loop: no
    thread, and no wait on the client (the few bytes fit any socket's send buffer)."""
    body = json.dumps({"error": f"Server busy: {max_connections} connections are open, this "
                               "server's limit --rest_max_connections; retry later"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.setblocking(False)
        sock.send(head + body)
    except OSError:  # the client is gone, or its window is closed: it is refused either way
        pass


def make_rest_server(manager, host, port, max_request_bytes=0, metrics=None,
                     metrics_path=None, read_timeout_seconds=60.0,
                     request_timeout_seconds=None, max_connections=0,
                     max_body_bytes_in_flight=0):
    """A threading HTTP server (run `serve_forever()` in a thread) and its `InFlight` count.

    `read_timeout_seconds` closes a connection that sends nothing for that long (None: never);
    `request_timeout_seconds` answers 408 to a request that has not arrived whole that long
    after its first byte (None: no limit); `max_connections` caps the open connections and
    `max_body_bytes_in_flight` the bytes of request bodies held at once (0: no cap).
    """
    in_flight = InFlight()
    capacity = _Capacity(max_connections, max_body_bytes_in_flight)
    handler = type("RestHandler", (_Handler,), {
        "manager": manager, "in_flight": in_flight, "max_request_bytes": max_request_bytes,
        "metrics": metrics, "metrics_path": metrics_path, "timeout": read_timeout_seconds,
        "request_timeout": request_timeout_seconds, "capacity": capacity,
        "deadlines": _Deadlines()})
    server = _RestServer((host, port), handler)
    server.capacity = capacity
    return server, in_flight
