"""Bounded parsing in `ifa-serve` (issue 34): REST JSON nested too deep and gRPC shapes of too
many dims are refused from their bytes, before they are parsed; one budget of bytes in flight
covers gRPC and REST together; REST headers have a byte cap. Small bodies, small caps, an
in-process server on loopback."""

import json
import random
import shutil
import threading
import time

import grpc
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     predict_pb2, prediction_service_pb2_grpc)

from ifa_tf import export
from ifa_tf.serving import errors, parsing, rest
from ifa_tf.serving.model_manager import Signature
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_serving import free_port
from test_serving_config import SCHEMA, tiny_model  # noqa: F401 (a fixture used by name)
from test_serving_versions import connect, exchange, post_head

MAX_REQUEST_BYTES = 4096


@pytest.fixture(scope="module")
def features(tiny_model):  # noqa: F811 (the imported fixture)
    return export.random_features(export.serving_specs(tiny_model), 1, 5, 7)


@pytest.fixture(scope="module")
def model_base(tiny_model, tmp_path_factory):  # noqa: F811 (the imported fixture)
    base = tmp_path_factory.mktemp("parsing") / "m"
    export.export_saved_model(tiny_model, base, schema=SCHEMA, warmup_shapes=())
    return base


def start_server(base, tmp_path, **options):
    shutil.copytree(base, tmp_path / "m")
    return ModelServer(ServerOptions(
        model_name="m", model_base_path=str(tmp_path / "m"), port=0,
        rest_api_port=free_port(), file_system_poll_wait_seconds=0, shutdown_grace_seconds=2,
        max_request_bytes=MAX_REQUEST_BYTES, **options)).start()


@pytest.fixture
def stub_of():
    channels = []

    def stub(server):
        channels.append(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        return prediction_service_pb2_grpc.PredictionServiceStub(channels[-1])

    yield stub
    for channel in channels:
        channel.close()


def predict_request(features):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    for key, value in features.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def json_body(features):
    return json.dumps({"inputs": {k: v.tolist() for k, v in features.items()}}).encode()


# ------------------------------------------------------------------------------ JSON depth
def reference_depth(value):
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    return 0


def random_json(rng, depth):
    """Nested lists and objects, with strings that hold brackets, quotes and escapes."""
    kind = rng.choice(["list", "dict", "leaf"] if depth else ["leaf"])
    if kind == "leaf":
        return rng.choice([7, -1.5, None, True, '[{"', "]]}\\", "\\\"[", "é[", ""])
    children = [random_json(rng, depth - 1) for _ in range(rng.randrange(4))]
    if kind == "list":
        return children
    return {rng.choice(['k"[', "{k}", "\\]"]) + str(i): child for i, child in enumerate(children)}


def test_json_depth_equals_the_parsed_depth():
    rng = random.Random(0)
    for _ in range(300):
        value = random_json(rng, rng.randrange(8))
        body = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        assert parsing.json_depth(body) == reference_depth(value), body


def test_json_depth_spans_chunks_and_stops_once_past_the_limit(monkeypatch):
    monkeypatch.setattr(parsing, "_DEPTH_CHUNK", 7)
    body = b"[" * 20 + b"1" + b"]" * 20 + b",[[[]]]"
    assert parsing.json_depth(b"[" + body + b"]") == 21
    assert 5 < parsing.json_depth(b"[" + body + b"]", most=5) <= 21


def test_rest_json_nested_past_the_limit_is_refused_before_it_is_parsed(model_base, tmp_path,
                                                                         features):
    server = start_server(model_base, tmp_path, rest_max_json_depth=6)
    port = server.rest_port
    try:
        # Columnar, rank 2: 3 deep; row format: 4 deep. Both within 6.
        for body in (json_body(features), json.dumps({"instances": [
                {k: v[0].tolist() for k, v in features.items()}]}).encode()):
            assert exchange(port, post_head(port, Content_Length=len(body)), body)[0] == 200
        # Malformed after 7 levels: parsed first, it would be "JSON Parse error: Expecting".
        body = b'{"instances": ' + b"[" * 6 + b"1" + b"]" * 5 + b" oops"
        status, answer = exchange(port, post_head(port, Content_Length=len(body)), body)
        assert (status, answer) == (400, {"error": (
            "JSON Parse error: the request body nests arrays and objects more than 6 deep, "
            "this server's limit --rest_max_json_depth=6")})
    finally:
        server.stop()


# ------------------------------------------------------------------------------ gRPC dims
def with_dims(features, key, dims):
    """The request's bytes, `key`'s tensor_shape replaced by `dims` (Dim messages)."""
    request = predict_request(features)
    request.inputs[key].tensor_shape.Clear()
    request.inputs[key].tensor_shape.dim.extend(dims)
    return request.SerializeToString()


def test_grpc_dims_are_counted_before_the_request_is_parsed(features, monkeypatch):
    Dim = tensor_shape_pb2.TensorShapeProto.Dim
    within = with_dims(features, "cand_item_id", [Dim(size=1, name="a" * 40)] * 4)
    assert parsing.parse_predict_request(within, 4) == predict_pb2.PredictRequest.FromString(
        within)
    with pytest.raises(errors.ServingError) as raised:
        parsing.parse_predict_request(with_dims(features, "cand_item_id", [Dim(size=1)] * 5), 4)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.message == ("Input cand_item_id: tensor_shape declares more than 4 "
                                    "dims, this server's limit --max_input_dims=4 (5 dims)")

    parse_shape = tensor_shape_pb2.TensorShapeProto.FromString

    def small_shapes_only(data):
        assert len(data) < 1000, "a long tensor_shape was parsed"
        return parse_shape(data)

    def never(data):
        raise AssertionError("the request was parsed")

    # 100,000 empty dims (2 bytes each): refused from the shape's byte count alone.
    empty_dims = with_dims(features, "seq_item_id", [Dim()] * 100_000)
    monkeypatch.setattr(tensor_shape_pb2.TensorShapeProto, "FromString", small_shapes_only)
    monkeypatch.setattr(predict_pb2.PredictRequest, "FromString", never)
    with pytest.raises(errors.ServingError) as raised:
        parsing.parse_predict_request(empty_dims, 4)
    assert raised.value.message == (
        "Input seq_item_id: tensor_shape declares more than 4 dims, this server's limit "
        "--max_input_dims=4 (200000 bytes, over the 64 a dim may take)")
    with pytest.raises(errors.ServingError) as raised:
        parsing.parse_predict_request(b"\x12\xff\xff", 4)
    assert raised.value.code == grpc.StatusCode.INTERNAL
    assert raised.value.message.startswith("Could not parse the PredictRequest")


def test_grpc_input_of_too_many_dims_is_refused_by_the_server(model_base, tmp_path, features,
                                                              stub_of):
    server = start_server(model_base, tmp_path, max_input_dims=3)
    try:
        stub = stub_of(server)
        assert stub.Predict(predict_request(features), timeout=30).outputs
        # The service registered by hand keeps the generated one's other methods.
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[
            "signature_def"])
        metadata.model_spec.name = "m"
        assert stub.GetModelMetadata(metadata, timeout=30).model_spec.name == "m"
        with pytest.raises(grpc.RpcError) as raised:
            stub.Classify(classification_pb2.ClassificationRequest(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        data = with_dims(features, "cand_item_id",
                         [tensor_shape_pb2.TensorShapeProto.Dim(size=1)] * 4)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_pb2.PredictRequest.FromString(data), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max_input_dims=3 (4 dims)" in raised.value.details()
    finally:
        server.stop()


# --------------------------------------------------------------------- bytes in flight
def test_byte_budget_reserves_and_refuses_past_its_limit():
    budget = parsing.ByteBudget(100)
    with budget.reserved(60):
        assert budget.in_use == 60
        with pytest.raises(errors.ServingError) as raised:
            budget.reserve(41)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert "--max_bytes_in_flight=100 (60 in use)" in raised.value.message
        budget.reserve(40)
        budget.release(40)
    assert budget.in_use == 0
    parsing.ByteBudget(0).reserve(10**12)  # no limit


def test_bytes_in_flight_are_capped_over_grpc_and_rest_together(model_base, tmp_path,
                                                                 features, stub_of,
                                                                 monkeypatch):
    request = predict_request(features)
    body = json_body(features)
    cap = MAX_REQUEST_BYTES + 200
    server = start_server(model_base, tmp_path, max_bytes_in_flight=cap)
    port = server.rest_port
    stub = stub_of(server)
    try:
        # A REST client that declared MAX_REQUEST_BYTES and sent 10 holds them: gRPC is
        # refused while it does.
        with connect(port) as stalled:
            stalled.sendall(post_head(port, Content_Length=MAX_REQUEST_BYTES).replace(
                b"\n", b"\r\n") + b"\r\n" + b'{"inputs":')
            deadline = time.monotonic() + 10
            while server.budget.in_use != MAX_REQUEST_BYTES and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.budget.in_use == MAX_REQUEST_BYTES
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"--max_bytes_in_flight={cap}" in raised.value.details()
        deadline = time.monotonic() + 10
        while server.budget.in_use and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stub.Predict(request, timeout=30).outputs

        # A gRPC call being answered holds its bytes: a REST body that does not fit beside
        # it is answered 503 before it is read.
        running, release = threading.Event(), threading.Event()
        original_run = Signature.run

        def held_run(self, *args, **kwargs):
            running.set()
            release.wait(30)
            return original_run(self, *args, **kwargs)

        monkeypatch.setattr(Signature, "run", held_run)
        call = stub.Predict.future(request, timeout=30)
        assert running.wait(30)
        assert server.budget.in_use == request.ByteSize()
        fits = cap - request.ByteSize()
        status, answer = exchange(port, post_head(port, Content_Length=fits + 1), b"")
        assert status == 503 and f"--max_bytes_in_flight={cap}" in answer["error"]
        release.set()
        assert call.result().outputs
        monkeypatch.setattr(Signature, "run", original_run)
        assert exchange(port, post_head(port, Content_Length=len(body)), body)[0] == 200
        assert server.budget.in_use == 0
    finally:
        release.set()
        server.stop()


# ---------------------------------------------------------------------------- header bytes
def test_rest_header_bytes_are_capped(model_base, tmp_path, features):
    server = start_server(model_base, tmp_path, rest_max_header_bytes=1024)
    port = server.rest_port
    body = json_body(features)
    refusal = {"error": "Request line and headers of more than 1024 bytes exceed this "
                        "server's limit --rest_max_header_bytes=1024"}
    def head_of(size):
        """A head of `size` bytes, request line and blank line included."""
        head = post_head(port, Content_Length=len(body), X_Pad="")
        return post_head(port, Content_Length=len(body),
                         X_Pad="a" * (size - len(head.replace(b"\n", b"\r\n")) - 2))

    try:
        assert exchange(port, head_of(1024), body)[0] == 200
        # Whole headers in one read: counted as parsed.
        assert exchange(port, head_of(1025), body) == (431, refusal)
        # A header line that never ends: counted as it arrives, refused without its end.
        with connect(port) as sock:
            sock.sendall(b"GET /v1/models/m HTTP/1.1\r\nX-Pad: ")
            for _ in range(4):
                time.sleep(0.05)
                sock.sendall(b"a" * 400)
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == refusal
    finally:
        server.stop()


def test_flags_of_the_parsing_limits_are_validated():
    for field in ("max_input_dims", "rest_max_json_depth", "rest_max_header_bytes",
                  "rest_api_num_threads"):
        with pytest.raises(ValueError, match=f"--{field} must be >= 0"):
            ServerOptions(model_base_path="/m", **{field: -1})
    with pytest.raises(ValueError, match="--max_bytes_in_flight must be at least "
                                         "--max_request_bytes"):
        ServerOptions(model_base_path="/m", max_request_bytes=100, max_bytes_in_flight=99)


def test_the_old_name_of_the_bytes_in_flight_flag_still_sets_it():
    from absl import flags

    from ifa_tf.cli import serve

    values = flags.FlagValues()
    serve.define_flags(values)
    values(["ifa-serve", "--rest_max_body_bytes_in_flight=12345"])
    assert values.max_bytes_in_flight == 12345
    for name in ("max_bytes_in_flight", "max_input_dims", "rest_max_json_depth",
                 "rest_max_header_bytes", "rest_api_num_threads"):
        assert values[name].default == getattr(ServerOptions, name), name


def test_rest_string_among_numbers_is_refused_before_numpy_pads_it(model_base, tmp_path,
                                                                    features):
    """NumPy makes `[1, "x" * 2000, ...]` an array of 2,000-character strings, one per
    element (1.6 GB for 200,000 elements): the string is found first, leaf by leaf."""
    server = start_server(model_base, tmp_path)
    port = server.rest_port
    try:
        for leaf, shown in (("x" * 100, '"' + "x" * 28 + "..."), ("7", '"7"')):
            payload = json.loads(json_body(features))
            payload["inputs"]["cand_item_id"][0][2] = leaf
            body = json.dumps(payload).encode()
            assert exchange(port, post_head(port, Content_Length=len(body)), body) == (
                400, {"error": f"Input cand_item_id expects int64 values; received {shown}, "
                               "not a number"})
        # Strings where they belong (keys, the signature name) need no look at the leaves.
        payload = json.loads(json_body(features))
        payload["signature_name"] = "serving_default"
        body = json.dumps(payload).encode()
        assert exchange(port, post_head(port, Content_Length=len(body)), body)[0] == 200
    finally:
        server.stop()


def test_strings_expected_counts_keys_and_the_signature_name():
    assert rest._strings_expected({"inputs": {"a": [1], "b": [2]}}) == 3
    assert rest._strings_expected({"signature_name": "s", "instances": [{"a": 1}, {"a": 2}]}) \
        == 2 + 1 + 2
    body = b'{"signature_name": "s", "instances": [{"a": 1}, {"a": 2}]}'
    assert body.count(b'"') == 2 * rest._strings_expected(json.loads(body))
