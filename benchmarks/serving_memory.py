"""What requests cost `ifa-serve` in memory at its default limits: accepted requests, the
parsing of the bodies that cost most per byte, refused requests, and REST connections' headers.

Exports a freshly built `ifa` (default schema) and starts `ifa-serve` with its default limits
(gRPC and REST). Before each measured request it sends a warm-up request and resets the
server's peak RSS (VmHWM, through /proc/<pid>/clear_refs); once the request is answered or
refused it reads how far the peak rose. Linux only.

    python benchmarks/serving_memory.py --output_dir=benchmarks/results/serving_memory

The groups (`--groups`):

- `accepted`: one gRPC request of random ids (every value sent, in tensor_content, so
  protobuf parsing, the arrays and the model's activations all count) per `--shapes` entry
  (B x m x n), each to a fresh server. The default shapes are those `serving/README.md`
  quotes: both totals (B·m = 200,000, B·n = 1,000,000) at the largest n (B = 10), at B = 200
  and at the largest B (1,000); the largest m and n of one user (B = 2); B alone at its bound;
  and the request of issue 24 (B = 200,000, m = n = 1), which --max_batch_size refuses.
- `parsing`: the bodies that cost most memory per byte to parse (of those we know), as large
  as --max_request_bytes lets them be, each to a fresh server. gRPC: `cand_item_id` as a
  packed int64 list of one-byte varints, or as a tensor_shape of empty dims (two bytes each;
  --max_input_dims refuses it from its bytes); REST: `cand_item_id` as empty lists, as lists
  nested as deep as --rest_max_json_depth allows, or nested 100 deep (refused from its bytes).
  Each declares a shape no limit allows, so it is refused once parsed: what it costs is its
  parsing and the checks.
- `concurrent`: --max_bytes_in_flight at work: `CONCURRENT_BODIES` gRPC requests of the
  largest m and n (B = 2, m = n = 100,000: 16.0 MB, the accepted request that costs most per
  byte) sent at once, a channel each, to a fresh server at the default cap and to one whose
  cap holds them all (as before the cap): those that fit are answered side by side, the
  others refused UNAVAILABLE before they are parsed.
- `refused`: requests refused for their declared shape or size, all to one fresh server:
  gRPC requests of a few hundred bytes declaring huge shapes in one value per input, a gRPC
  message and a REST body over --max_request_bytes, and a REST body over B·m (B = 3,
  m = 70,000).
- `connections`: --rest_max_connections (64) REST connections at once, each sending the
  most header bytes --rest_max_header_bytes lets through and `Content-Length: 1` but no
  body; the peak rise while all are held, the answer to one connection more, and the answer
  to a request whose headers pass the cap by one line.
"""

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = ["10x20000x100000", "200x1000x5000", "1000x200x1000", "2x100000x100000",
                  "1000x1x1", "200000x1x1"]
GROUPS = ["accepted", "parsing", "refused", "concurrent", "connections"]
# ifa-serve's defaults (ifa_tf/serving/options.py), which the bodies below are sized to.
MAX_REQUEST_BYTES = 64 * 2**20
MAX_BYTES_IN_FLIGHT = 64 * 2**20
REST_MAX_CONNECTIONS = 64
REST_MAX_HEADER_BYTES = 64 * 1024
REST_MAX_JSON_DEPTH = 16
HEADER_LINE_BYTES = 8 * 1024
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
REST_PATH = "/v1/models/ifa:predict"
NESTED_DEPTH = 100  # well within Python's recursion limit, which json.loads meets
CONCURRENT_BODIES = 6
CONCURRENT_SHAPE = (2, 100_000, 100_000)


def define_flags(flag_values=flags.FLAGS):
    f = flag_values
    flags.DEFINE_list("shapes", DEFAULT_SHAPES, "B x m x n of each accepted-group request.",
                      flag_values=f)
    flags.DEFINE_list("groups", GROUPS, f"Which groups to measure, of {GROUPS}.",
                      flag_values=f)
    flags.DEFINE_string("output_dir", "", "Where results.json and results.md go; empty: "
                        "print only.", flag_values=f)
    flags.DEFINE_string("note", "", "A line about the conditions (e.g. other work running), "
                        "written into results.md.", flag_values=f)
    flags.DEFINE_integer("timeout_s", 600, "Longest wait for one request.", flag_values=f)


FLAGS = flags.FLAGS


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class Server:
    """`ifa-serve` with its default limits in a subprocess, serving `ifa` over gRPC and
    REST; `measure(send)` is how far one call of `send` raises its peak RSS."""

    def __init__(self, base, log_path, schema, flags=()):
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.grpc_port, self.rest_port = _free_port(), _free_port()
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ifa_tf.cli.serve", f"--port={self.grpc_port}",
                 f"--rest_api_port={self.rest_port}", "--model_name=ifa",
                 f"--model_base_path={base}", "--file_system_poll_wait_seconds=0", *flags],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        # Sends bytes as they are: a request built on the wire, not through protobuf.
        self.predict_bytes = self.channel.unary_unary(
            PREDICT_METHOD, response_deserializer=predict_pb2.PredictResponse.FromString)
        self.warm = random_request(schema, 1, 8, 16, seed=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.stub.Predict(self.warm, timeout=30)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise RuntimeError(f"ifa-serve did not answer; see {log_path}") from None
                time.sleep(0.5)

    def peak_rss(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def measure(self, send):
        """`{answer, error, peak_growth_mb, seconds}` of `send()`, which returns
        `(answer, error)`."""
        self.stub.Predict(self.warm, timeout=60)  # threads and caches warm
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
            f.write("5")
        before = self.peak_rss()
        began = time.monotonic()
        answer, error = send()
        seconds = time.monotonic() - began
        return {"answer": answer, "error": error[:300],
                "peak_growth_mb": round((self.peak_rss() - before) / 1e6, 1),
                "seconds": round(seconds, 1)}

    def grpc(self, request, timeout_s):
        """`send` for a PredictRequest (or its bytes)."""
        import grpc

        def send():
            call = self.predict_bytes if isinstance(request, bytes) else self.stub.Predict
            try:
                call(request, timeout=timeout_s)
                return "answered", ""
            except grpc.RpcError as error:
                return error.code().name, f"{error.code().name}: {error.details()}"
        return send

    def rest(self, body, timeout_s):
        """`send` for a REST predict body."""
        def send():
            connection = http.client.HTTPConnection("127.0.0.1", self.rest_port,
                                                    timeout=timeout_s)
            try:
                connection.request("POST", REST_PATH, body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                text = response.read().decode()
            finally:
                connection.close()
            if response.status == 200:
                return "answered", ""
            return f"HTTP {response.status}", json.loads(text).get("error", text)
        return send

    def close(self):
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ----------------------------------------------------------------------------- requests
def random_request(schema, batch, m, n, seed):
    """A PredictRequest of random ids, every value on the wire."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ifa"
    for name, values in random_features(schema, batch, m, n, seed).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return request


def random_features(schema, batch, m, n, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.integers(1, 1_000_000, size=(batch,) if schema.rank(name) == 1 else (
                batch, n if name in schema.sequence_features else m), dtype=np.int64)
            for name in schema.feature_names}


def declared_request(schema, shapes, values=(1,), content=b""):
    """A PredictRequest whose inputs declare `shapes` (`{name: shape}`; the others are one
    user's, m = 4, n = 6) but carry `values` (one value fills a tensor, TF Serving's rule)
    or `content`: a few bytes on the wire declare any size."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    request = random_request(schema, 1, 4, 6, seed=2)
    for name, shape in shapes.items():
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_content=content)
        tensor.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=size)
                                       for size in shape)
        tensor.int64_val.extend(values)
        request.inputs[name].CopyFrom(tensor)
    return request


def every_input(schema, batch, m, n):
    return {name: [batch] if schema.rank(name) == 1 else
            [batch, n if name in schema.sequence_features else m]
            for name in schema.feature_names}


def wire_request(schema, size, tensor_fields):
    """The bytes of a PredictRequest of at most `size` bytes: one user's inputs (m = 4,
    n = 6), but `cand_item_id` is a TensorProto of dtype int64 followed by
    `tensor_fields(count)`, the largest `count` that fits."""
    others = random_request(schema, 1, 4, 6, seed=2)
    del others.inputs["cand_item_id"]
    head = others.SerializeToString()

    def message(count):
        tensor = _varint(1 << 3) + _varint(9) + tensor_fields(count)  # dtype: DT_INT64
        return head + _field(2, _field(1, b"cand_item_id") + _field(2, tensor))

    count = size - len(message(0))
    while len(message(count)) > size:  # the length prefixes grow with the count
        count -= 1
    return message(count)


def packed_ones(count):
    """tensor_shape [1, count] and int64_val of `count` ones, a byte each, packed."""
    shape = _field(2, _field(2, _varint(1 << 3) + _varint(1))
                   + _field(2, _varint(1 << 3) + _varint(count)))
    return shape + _field(10, b"\x01" * count)


def empty_dims(count):
    """A tensor_shape of `count // 2` empty dims, two bytes each."""
    return _field(2, b"\x12\x00" * (count // 2))


def json_body(schema, size, item):
    """A REST body of at most `size` bytes: one user's inputs (m = 4, n = 6), but
    `cand_item_id` is a list of copies of the JSON `item` (B over --max_batch_size)."""
    others = {name: values.tolist() for name, values in
              random_features(schema, 1, 4, 6, seed=2).items() if name != "cand_item_id"}
    head = json.dumps({"inputs": others})[:-2].encode() + b', "cand_item_id": ['
    tail = b"]}}"
    count = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    return head + b",".join([item] * count) + tail


def over_total_body(schema):
    """B = 3, m = 70,000: each user within --max_candidates, B·m over the total."""
    return json.dumps({"inputs": {
        name: np.ones([3] if schema.rank(name) == 1 else
                      [3, 1 if name in schema.sequence_features else 70_000],
                      np.int64).tolist() for name in schema.feature_names}}).encode()


def rest_head(server, length):
    """`send` that declares a body of `length` bytes and sends none of it."""
    def send():
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as sock:
            sock.sendall(f"POST {REST_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}"
                         f"\r\n\r\n".encode())
            return _http_answer(sock)
    return send


def _http_answer(sock):
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "none"
    length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    try:
        error = json.loads(body).get("error", "")
    except ValueError:
        error = body.decode(errors="replace")
    return f"HTTP {status}", error


def padded_head(size):
    """A REST predict head (request line, headers, blank line) of exactly `size` bytes,
    declaring a body of one byte: header lines of at most HEADER_LINE_BYTES pad it."""
    first = f"POST {REST_PATH} HTTP/1.1\r\nContent-Length: 1\r\n".encode()
    lines, left, index = [], size - len(first) - 2, 0
    while left > 0:
        name = f"X-Pad-{index}: ".encode()
        length = min(HEADER_LINE_BYTES, left)
        if 0 < left - length < len(name) + 3:  # too little left for a line of its own
            length = left - len(name) - 3
        lines.append(name + b"a" * (length - len(name) - 2) + b"\r\n")
        left -= length
        index += 1
    head = first + b"".join(lines) + b"\r\n"
    assert len(head) == size, (len(head), size)
    return head


def held_connections(server, count):
    """`send` that opens `count` REST connections, each sending the most header bytes
    --rest_max_header_bytes lets through and a Content-Length whose body never comes, waits
    until the server has read them all, then opens one connection more and returns its
    answer."""
    head = padded_head(REST_MAX_HEADER_BYTES)

    def send():
        sockets = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=60)
                sockets.append(sock)
                sock.sendall(head)
            # Sent is not read: wait until the peak holds still (every header parsed).
            peak, still = server.peak_rss(), 0
            while still < 3:
                time.sleep(1)
                latest = server.peak_rss()
                still = still + 1 if latest == peak else 0
                peak = latest
            with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as sock:
                return _http_answer(sock)
        finally:
            for sock in sockets:
                sock.close()
    return send, len(head)


def over_header_cap(server):
    """`send` of one request whose head is a byte over --rest_max_header_bytes."""
    def send():
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=60) as sock:
            sock.sendall(padded_head(REST_MAX_HEADER_BYTES + 1) + b"x")
            return _http_answer(sock)
    return send


def concurrent_bodies(server, bodies, timeout_s):
    """`send` of `bodies` (gRPC message bytes) at once, a thread and a channel each; its
    answer counts the outcomes by status, and its error is one refusal's message."""
    import grpc
    from tensorflow_serving.apis import predict_pb2

    def send():
        outcomes, lock = [], threading.Lock()
        start = threading.Barrier(len(bodies))

        def call(body):
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1)]) as channel:
                predict = channel.unary_unary(
                    PREDICT_METHOD, response_deserializer=predict_pb2.PredictResponse.FromString)
                grpc.channel_ready_future(channel).result(timeout=60)
                start.wait()
                try:
                    predict(body, timeout=timeout_s)
                    outcome = ("answered", "")
                except grpc.RpcError as error:
                    outcome = (error.code().name, f"{error.code().name}: {error.details()}")
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=call, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counts = {}
        for answer, _ in outcomes:
            counts[answer] = counts.get(answer, 0) + 1
        refusal = next((error for answer, error in outcomes if answer == "UNAVAILABLE"), "")
        return ", ".join(f"{count} {answer}" for answer, count in sorted(counts.items())), \
            refusal
    return send


# -------------------------------------------------------------------------------- groups
def accepted(base, schema, workdir):
    rows = []
    for shape in FLAGS.shapes:
        batch, m, n = (int(d) for d in shape.split("x"))
        server = Server(base, os.path.join(workdir, f"serve-{shape}.log"), schema)
        try:
            request = random_request(schema, batch, m, n, seed=1)
            row = {"batch": batch, "m": m, "n": n,
                   "request_mb": round(request.ByteSize() / 1e6, 1),
                   **server.measure(server.grpc(request, FLAGS.timeout_s))}
        finally:
            server.close()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parsing(base, schema, workdir):
    def nested(depth):
        return b"[" * depth + b"]" * depth

    # The body nests 3 levels (object, inputs, the list of copies) around each copy.
    allowed = REST_MAX_JSON_DEPTH - 3
    cases = [("gRPC", "int64_val: one-byte varints, packed",
              wire_request(schema, MAX_REQUEST_BYTES, packed_ones)),
             ("gRPC", "tensor_shape: empty dims",
              wire_request(schema, MAX_REQUEST_BYTES, empty_dims)),
             ("REST", "empty lists: `[],[],...`", json_body(schema, MAX_REQUEST_BYTES, b"[]")),
             ("REST", f"lists nested {allowed} deep ({REST_MAX_JSON_DEPTH} in all, the limit)",
              json_body(schema, MAX_REQUEST_BYTES, nested(allowed))),
             ("REST", f"lists nested {NESTED_DEPTH} deep",
              json_body(schema, MAX_REQUEST_BYTES, nested(NESTED_DEPTH)))]
    rows = []
    for protocol, case, body in cases:
        server = Server(base, os.path.join(workdir, f"serve-parse-{protocol}.log"), schema)
        try:
            send = (server.grpc if protocol == "gRPC" else server.rest)(body, FLAGS.timeout_s)
            row = {"protocol": protocol, "case": case, "request_bytes": len(body),
                   **server.measure(send)}
        finally:
            server.close()
        row["growth_per_byte"] = round(row["peak_growth_mb"] * 1e6 / len(body), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def refused(base, schema, workdir):
    over_limit = MAX_REQUEST_BYTES + 8 * 2**20
    cases = [  # smallest first: memory freed by one case may be reused by the next
        ("gRPC", "m of 10^9 in one value",
         declared_request(schema, {"cand_item_id": [1, 10**9]})),
        ("gRPC", "n of 2·10^8 in one value",
         declared_request(schema, {"seq_item_id": [1, 2 * 10**8]})),
        ("gRPC", "a dim of -5 over 4 values",
         declared_request(schema, {"cand_item_id": [1, -5]}, values=(),
                          content=np.arange(5, 9, dtype=np.int64).tobytes())),
        ("gRPC", "B = 8, m = n = 100,000 in one value per input",
         declared_request(schema, every_input(schema, 8, 100_000, 100_000))),
        ("gRPC", "B = 200,000, m = n = 1 in one value per input",
         declared_request(schema, every_input(schema, 200_000, 1, 1))),
        ("REST", "Content-Length over --max_request_bytes, no body", over_limit),
        ("gRPC", "a message over --max_request_bytes",
         declared_request(schema, {"cand_item_id": [1, over_limit // 8]}, values=(),
                          content=bytes(over_limit // 8 * 8))),
        ("REST", "B = 3, m = 70,000: over B·m", over_total_body(schema)),
    ]
    rows = []
    server = Server(base, os.path.join(workdir, "serve-refused.log"), schema)
    try:
        for protocol, case, request in cases:
            if protocol == "gRPC":
                size, send = request.ByteSize(), server.grpc(request, FLAGS.timeout_s)
            elif isinstance(request, int):
                size, send = request, rest_head(server, request)
            else:
                size, send = len(request), server.rest(request, FLAGS.timeout_s)
            row = {"protocol": protocol, "case": case, "request_bytes": size,
                   **server.measure(send)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.close()
    return rows


def concurrent(base, schema, workdir):
    """The requests against the default --max_bytes_in_flight, and against a cap that holds
    them all (what a server without the cap takes on at once)."""
    bodies = [random_request(schema, *CONCURRENT_SHAPE, seed=index).SerializeToString()
              for index in range(CONCURRENT_BODIES)]
    rows = []
    for cap in (MAX_BYTES_IN_FLIGHT, sum(map(len, bodies))):
        server = Server(base, os.path.join(workdir, f"serve-concurrent-{cap}.log"), schema,
                        [f"--max_bytes_in_flight={cap}"])
        try:
            row = {"requests": CONCURRENT_BODIES, "request_bytes": len(bodies[0]),
                   "max_bytes_in_flight": cap,
                   **server.measure(concurrent_bodies(server, bodies, FLAGS.timeout_s))}
        finally:
            server.close()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def connections(base, schema, workdir):
    server = Server(base, os.path.join(workdir, "serve-connections.log"), schema)
    try:
        send, head_bytes = held_connections(server, REST_MAX_CONNECTIONS)
        row = {"connections": REST_MAX_CONNECTIONS, "header_bytes": head_bytes,
               **server.measure(send)}
        over = server.measure(over_header_cap(server))
        row["over_header_cap"] = {"header_bytes": REST_MAX_HEADER_BYTES + 1, **over}
    finally:
        server.close()
    row["growth_per_connection_mb"] = round(row["peak_growth_mb"] / REST_MAX_CONNECTIONS, 1)
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------- results
def per_unit(rows):
    """Costs in KB read off the default shapes' accepted rows, or {} without them: an event
    from the two that differ only in B·n (10 x 20,000 x 100,000 and 2 x 100,000 x 100,000:
    800,000 more events), a candidate from the second less its events at that rate, a user
    from B = 1,000 of m = n = 1 (which holds the request's fixed cost too)."""
    growth = {(r["batch"], r["m"], r["n"]): r["peak_growth_mb"] * 1e3
              for r in rows if r["answer"] == "answered"}
    wide, narrow, users = (10, 20_000, 100_000), (2, 100_000, 100_000), (1000, 1, 1)
    if not {wide, narrow, users} <= growth.keys():
        return {}
    event = (growth[wide] - growth[narrow]) / 800_000
    return {"event_kb": round(event, 2),
            "candidate_kb": round((growth[narrow] - 200_000 * event) / 200_000, 2),
            "user_kb": round(growth[users] / 1000, 1)}


def markdown(results):
    sections = []
    if "accepted" in results:
        lines = ["## Accepted requests", "",
                 "One gRPC request of random ids per fresh server.", "",
                 "| B | m | n | request | answer | peak RSS growth | time |",
                 "|---:|---:|---:|---:|---|---:|---:|"]
        for row in results["accepted"]:
            answer = row["answer"] if row["answer"] == "answered" else f"{row['answer']} (refused)"
            lines.append(f"| {row['batch']:,} | {row['m']:,} | {row['n']:,} | "
                         f"{row['request_mb']:.1f} MB | {answer} | "
                         f"{row['peak_growth_mb']:,.0f} MB | {row['seconds']:.1f} s |")
        unit = results.get("per_unit")
        if unit:
            lines += ["", f"Per unit (`per_unit` in results.json): a sequence event "
                          f"{unit['event_kb']} KB, a candidate {unit['candidate_kb']} KB, a "
                          f"user {unit['user_kb']} KB."]
        sections.append("\n".join(lines))
    if "parsing" in results:
        lines = ["## Parsing", "",
                 "The bodies that cost most memory per byte to parse (of those we know), as "
                 f"large as --max_request_bytes ({MAX_REQUEST_BYTES:,} bytes) lets them be, "
                 "each to a fresh server. One input, `cand_item_id`, is the body's bulk; the "
                 "others are one user's. Each declares a shape no limit allows, so it is "
                 "refused once parsed; the gRPC shape of empty dims (--max_input_dims) and "
                 "the REST lists nested 100 deep (--rest_max_json_depth) are refused from "
                 "their bytes, before parsing.",
                 "", "| protocol | body | size | answer | peak RSS growth | growth / size | "
                 "time |", "|---|---|---:|---|---:|---:|---:|"]
        for row in results["parsing"]:
            lines.append(f"| {row['protocol']} | {row['case']} | "
                         f"{row['request_bytes'] / 1e6:.1f} MB | {row['answer']} | "
                         f"{row['peak_growth_mb']:,.0f} MB | {row['growth_per_byte']:.1f}× | "
                         f"{row['seconds']:.1f} s |")
        sections.append("\n".join(lines))
    if "refused" in results:
        lines = ["## Refused requests", "",
                 "One fresh server, the requests in this order.", "",
                 "| protocol | request | size | answer | peak RSS growth |",
                 "|---|---|---:|---|---:|"]
        for row in results["refused"]:
            lines.append(f"| {row['protocol']} | {row['case']} | "
                         f"{_size(row['request_bytes'])} | {row['answer']} | "
                         f"{row['peak_growth_mb']:.1f} MB |")
        sections.append("\n".join(lines))
    if "concurrent" in results:
        rows = results["concurrent"]
        batch, m, n = CONCURRENT_SHAPE
        lines = ["## Concurrent requests", "",
                 f"{rows[0]['requests']} gRPC requests of random ids (B = {batch}, m = n = "
                 f"{m:,}: {rows[0]['request_bytes']:,} bytes each) sent at once, a channel "
                 "each, to a fresh server per row: at the default --max_bytes_in_flight, and "
                 "at a cap that holds them all (as without the cap).", "",
                 "| --max_bytes_in_flight | answers | peak RSS growth | time |",
                 "|---:|---|---:|---:|"]
        for row in rows:
            lines.append(f"| {row['max_bytes_in_flight']:,} | {row['answer']} | "
                         f"{row['peak_growth_mb']:,.0f} MB | {row['seconds']:.1f} s |")
        refusal = next((row["error"] for row in rows if row["error"]), "")
        if refusal:
            lines += ["", f"A refusal: `{refusal}`."]
        sections.append("\n".join(lines))
    if "connections" in results:
        row = results["connections"]
        over = row["over_header_cap"]
        sections.append("\n".join([
            "## REST connections", "",
            f"{row['connections']} connections at once (--rest_max_connections), each "
            f"sending {row['header_bytes']:,} bytes of request line and headers (the most "
            f"--rest_max_header_bytes lets through, in lines of at most "
            f"{HEADER_LINE_BYTES:,} bytes) and no body: the peak RSS rose by "
            f"**{row['peak_growth_mb']:,.0f} MB** ({row['growth_per_connection_mb']} MB per "
            f"connection) while all were held. One connection more: {row['answer']}. A "
            f"request of {over['header_bytes']:,} header bytes: {over['answer']} "
            f"(`{over['error']}`), {over['peak_growth_mb']:.1f} MB."]))
    return "\n\n".join(sections)


def _size(size):
    return f"{size:,} B" if size < 100_000 else f"{size / 1e6:.1f} MB"


def main(argv):
    del argv
    import keras
    import tensorflow as tf
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # not TensorFlow's export info lines

    import ifa_tf
    from ifa_tf import export
    from ifa_tf.benchmark.runner import git_commit, script_command
    from ifa_tf.schema import default_schema

    unknown = sorted(set(FLAGS.groups) - set(GROUPS))
    if unknown:
        raise app.UsageError(f"--groups: unknown {unknown}; choose from {GROUPS}")
    schema = default_schema()
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="serving_memory_") as workdir:
        keras.utils.set_random_seed(0)
        base = os.path.join(workdir, "ifa")
        export.export_saved_model(ifa_tf.zoo.build("ifa", schema=schema), base, schema=schema)
        for group in GROUPS:
            if group in FLAGS.groups:
                results[group] = globals()[group](base, schema, workdir)
    if "accepted" in results:
        results["per_unit"] = per_unit(results["accepted"])
    command = script_command(__file__)
    header = (f"Model `ifa` (default schema), `ifa-serve` with its default limits; "
              f"{platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
              f"1-min load average {load_before:.1f} before the run. Peak RSS growth: how far "
              "one request raised the server process's peak resident set (VmHWM).")
    text = header + "\n\n" + markdown(results)
    print(text)
    if FLAGS.output_dir:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        commit = git_commit(REPO)
        with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
            json.dump({"command": command, "git_commit": commit, **results,
                       "load_average_1min": load_before, "note": FLAGS.note}, f, indent=2)
            f.write("\n")
        with open(os.path.join(FLAGS.output_dir, "results.md"), "w") as f:
            f.write(f"# Memory of `ifa-serve` requests\n\nCommand: `{command}`, at commit "
                    f"{commit}.\n\n" + (f"{FLAGS.note}\n\n" if FLAGS.note else "")
                    + text + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
