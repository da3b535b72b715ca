"""`ifa-serve` against hostile requests (issues 12 and 24): every declared shape is checked
before anything is materialised, B, B·m and B·n are bounded by default and the server's peak
memory stays within the bound `serving/README.md` documents, REST ids beyond int64 are
refused, a call whose client is gone runs no model, errors never echo a request's bulk,
metrics cannot be forged or grown by clients, and a model computing NaN never answers OK
nor passes its warm-up.
Servers listen on loopback only."""

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from ifa_tf import export
from ifa_tf.serving import errors, grpc_service, metrics
from ifa_tf.serving.model_manager import (Limits, ModelConfig, ModelManager, Signature,
                                          State, tensor_proto_spec, to_ndarray)
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_serving import (REPO, SCHEMA, ServeProcess, build_model, free_port,
                          make_features, predict_request, rest)

# What one refused request may add to the server's peak RSS: the request itself is a few KB,
# so this is allocator and thread noise. serving/README.md ("Limits") quotes it.
PEAK_RSS_BOUND_BYTES = 32 * 2**20


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening") / "ifa"
    export.export_saved_model(build_model("ifa", 0), base, schema=SCHEMA, warmup_shapes=())
    return base


class ServerProcess(ServeProcess):
    """`ifa-serve` with its default limits in a subprocess, serving `ifa` from `base`."""

    def __init__(self, base, log_path):
        self.start(log_path, [
            "--model_name=ifa", f"--model_base_path={base}", "--file_system_poll_wait_seconds=0",
            f"--monitoring_config_file={REPO}/serving/monitoring.config"])

    def peak_rss(self):
        """VmHWM, the process's peak resident set, in bytes."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def reset_peak_rss(self):
        """Sets VmHWM back to the current RSS (Linux >= 4.0). Where that is not allowed the
        old peak stays, which only makes the growth measured from it smaller."""
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


@pytest.fixture(scope="module")
def server(model_base, tmp_path_factory):
    server = ServerProcess(model_base, tmp_path_factory.mktemp("logs") / "ifa-serve.log")
    yield server
    assert server.stop() == 0, server.logs()


def proto(shape, dtype=types_pb2.DT_INT64, values=(), content=b"", unknown_rank=False):
    """A `TensorProto` that declares `shape` whatever it carries. One value is broadcast to
    every element (TF Serving's rule): a few bytes on the wire declare any size."""
    tensor = tensor_pb2.TensorProto(dtype=dtype, tensor_content=content)
    tensor.tensor_shape.unknown_rank = unknown_rank
    tensor.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=size)
                                   for size in shape)
    tensor.int64_val.extend(values)
    return tensor


def small_request():
    return predict_request(make_features(1, 4, 6, seed=0))


def with_input(request, key, proto):
    request.inputs[key].CopyFrom(proto)
    return request


def every_input_filled(batch, m, n):
    request = small_request()
    for key in SCHEMA.feature_names:
        shape = [batch] if SCHEMA.rank(key) == 1 else [batch, n if key.startswith("seq_") else m]
        request.inputs[key].CopyFrom(proto(shape, values=[1]))
    return request


def negative_dim():
    """[1, -5] over the 4 values of a real row: NumPy's reshape reads -5 as 'infer'."""
    row = np.array([5, 6, 7, 8], np.int64).tobytes()
    return with_input(small_request(), "cand_item_id", proto([1, -5], content=row))


# The requests, each a few hundred bytes: (request, what the refusal must name).
MALICIOUS_GRPC = {
    "m of 10^9 in one value": (
        lambda: with_input(small_request(), "cand_item_id", proto([1, 10**9], values=[1])),
        ["cand_item_id", "--max_candidates=100000"]),
    "n of 2e8 in one value": (
        lambda: with_input(small_request(), "seq_item_id", proto([1, 2 * 10**8], values=[1])),
        ["seq_item_id", "--max_sequence_length=100000"]),
    "negative dim": (negative_dim, ["cand_item_id", "dimension 1", "negative"]),
    "B=8, m=n=100k": (lambda: every_input_filled(8, 100_000, 100_000),
                      ["800000 candidates", "--max_total_candidates=200000"]),
    # Within B·m and B·n, but every user has a fixed cost: this one took 3.76 GB (issue 24).
    "B=200k, m=n=1": (lambda: every_input_filled(200_000, 1, 1),
                      ["batch size 200000", "--max_batch_size=1000"]),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_GRPC))
def test_malicious_grpc_request_is_refused_within_the_memory_bound(server, case):
    build, named = MALICIOUS_GRPC[case]
    request = build()
    assert request.ByteSize() < 2000
    server.predict_stub.Predict(small_request(), timeout=60)  # threads and caches warm
    server.reset_peak_rss()
    before = server.peak_rss()
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(request, timeout=60)
    growth = server.peak_rss() - before
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    for text in named:
        assert text in raised.value.details()
    assert growth <= PEAK_RSS_BOUND_BYTES, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert server.predict_stub.Predict(small_request(), timeout=60).outputs


def test_rest_request_over_the_total_is_refused_before_any_array(server):
    """B = 3, m = 70k: each user within --max_candidates, B·m = 210k over the total. Its
    3.2 MB body parses to JSON lists that raised the peak by 14.6 MB
    (benchmarks/results/serving_memory), and nothing more may be built."""
    body = {key: np.ones([3] if SCHEMA.rank(key) == 1 else
                         [3, 1 if key.startswith("seq_") else 70_000], np.int64).tolist()
            for key in SCHEMA.feature_names}
    server.reset_peak_rss()
    before = server.peak_rss()
    status, answer = rest(server, "/v1/models/ifa:predict", {"inputs": body})
    growth = server.peak_rss() - before
    assert status == 400, answer
    assert "210000 candidates" in answer["error"]
    assert "--max_total_candidates=200000" in answer["error"]
    assert growth <= PEAK_RSS_BOUND_BYTES, f"peak RSS grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("values", [[5, 6, 7], []], ids=["3 values for 4", "none for 4"])
def test_grpc_values_must_fill_the_declared_shape(server, values):
    features = make_features(1, 4, 6, seed=0)
    features["cand_item_id"][:] = 9
    expected = server.predict_stub.Predict(predict_request(features), timeout=60)
    one_value = with_input(predict_request(features), "cand_item_id", proto([1, 4], values=[9]))
    assert server.predict_stub.Predict(one_value, timeout=60) == expected  # TF Serving's fill
    request = with_input(predict_request(features), "cand_item_id", proto([1, 4], values=values))
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (f"Input cand_item_id: malformed TensorProto: tensor_shape [1, 4] holds 4 values "
            f"but {len(values)} were sent in int64_val") in raised.value.details()


@pytest.mark.parametrize("key, ids, value", [
    ("cand_item_id", [2**64 - 1, 7, 7, 7], "18446744073709551615"),
    ("cand_item_id", [3, 2**64 - 1, 7, 7], "18446744073709551615"),
    ("cand_item_id", [2**63, 7, 7, 7], "9223372036854775808"),
    ("cand_item_id", [-2**63 - 1, 7, 7, 7], "-9223372036854775809"),
    ("user_id", [2**64 - 1], "18446744073709551615"),
], ids=["2^64-1", "mixed with small ids", "2^63", "below -2^63", "user id 2^64-1"])
def test_rest_ids_beyond_int64_are_refused(server, key, ids, value):
    body = {name: array.tolist() for name, array in make_features(1, 4, 6, seed=0).items()}
    body[key] = ids if SCHEMA.rank(key) == 1 else [ids]
    status, answer = rest(server, "/v1/models/ifa:predict", {"inputs": body})
    assert status == 400, answer
    assert answer["error"] == (
        f"Input {key} expects int64 values; received {value}, outside the range "
        f"[-9223372036854775808, 9223372036854775807]")


def test_rest_id_of_5000_digits_is_refused(server):
    """Python's JSON parser refuses integers of over 4300 digits with a plain ValueError."""
    body = {name: array.tolist() for name, array in make_features(1, 4, 6, seed=0).items()}
    del body["user_id"]
    data = json.dumps({"inputs": body})[:-2] + ', "user_id": [' + "9" * 5000 + "]}}"
    request = urllib.request.Request(f"http://{server.rest_target}/v1/models/ifa:predict",
                                     data=data.encode())
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"].startswith("JSON Parse error: Exceeds the")


# ---------------------------------------------------------------------- the shared check
@pytest.mark.parametrize("tensor, message", [
    (proto([2], values=[1, 2]), None),
    (proto([2, 3], values=[7]), None),
    (proto([2, 0]), None),
    (proto([2], content=np.array([1, 2], np.int64).tobytes()), None),
    (proto([3], content=np.array([1, 2], np.int64).tobytes()),
     "tensor_shape [3] of int64 needs 24 bytes of tensor_content; received 16"),
    (proto([0], values=[7]), "tensor_shape [0] holds 0 values but 1 were sent in int64_val"),
    (proto([], unknown_rank=True, values=[7]), "unknown rank"),
    (proto([1], dtype=999, values=[7]), "dtype 999 cannot be sent in a request"),
    (proto([1], dtype=types_pb2.DT_RESOURCE), "dtype DT_RESOURCE cannot be sent in a request"),
], ids=["full", "one value fills", "empty", "content", "short content", "value for empty",
        "unknown rank", "unknown dtype", "resource"])
def test_tensor_proto_spec_reads_the_declared_shape_only(tensor, message):
    if message is None:
        dtype, shape = tensor_proto_spec(tensor, "x")
        assert dtype == np.int64 and shape == tuple(d.size for d in tensor.tensor_shape.dim)
        assert to_ndarray(tensor, "x").shape == shape
    else:
        with pytest.raises(errors.ServingError) as raised:
            tensor_proto_spec(tensor, "x")
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.message.startswith("Input x: malformed TensorProto: ")
        assert message in raised.value.message


def signature_with(inputs):
    """A `Signature` (no function) whose inputs are `{name: rank}`, all int64."""
    signature_def = meta_graph_pb2.SignatureDef()
    for key, rank in inputs.items():
        signature_def.inputs[key].dtype = types_pb2.DT_INT64
        signature_def.inputs[key].tensor_shape.dim.extend(
            [tensor_shape_pb2.TensorShapeProto.Dim(size=-1)] * rank)
    return Signature("serving_default", None, signature_def)


def test_totals_bound_batch_and_inputs_of_any_shape():
    limits = Limits(max_total_candidates=100, max_total_sequence_length=1000)
    int64 = np.dtype(np.int64)
    signature = signature_with({"user_id": 1, "cand_item_id": 2, "seq_item_id": 2})
    signature.check_inputs({"user_id": (int64, (10,)), "cand_item_id": (int64, (10, 10)),
                            "seq_item_id": (int64, (10, 100))}, limits)
    with pytest.raises(errors.ServingError, match=r"holds B·max\(m, 1\) = 101 candidates, "
                                                  r"over this server's limit "
                                                  r"--max_total_candidates=100"):
        signature.check_inputs({"user_id": (int64, (101,)), "cand_item_id": (int64, (101, 0)),
                                "seq_item_id": (int64, (101, 0))}, limits)
    with pytest.raises(errors.ServingError, match="--max_total_sequence_length=1000"):
        signature.check_inputs({"user_id": (int64, (2,)), "cand_item_id": (int64, (2, 1)),
                                "seq_item_id": (int64, (2, 501))}, limits)
    other = signature_with({"user_id": 1, "embedding": 3})
    with pytest.raises(errors.ServingError, match=r"Input embedding of shape \[1, 1, 1001\] "
                                                  r"holds 1001 values"):
        other.check_inputs({"user_id": (int64, (1,)), "embedding": (int64, (1, 1, 1001))},
                           limits)


def test_server_bounds_the_totals_by_default():
    limits = ServerOptions(model_base_path="/m").limits()
    assert (limits.max_total_candidates, limits.max_total_sequence_length) == (
        200_000, 1_000_000)
    with pytest.raises(ValueError, match="--max_total_candidates must be >= 0"):
        ServerOptions(model_base_path="/m", max_total_candidates=-1)


# ------------------------------------------------------------------ deadlines and cancels
@pytest.mark.parametrize("ending, code", [("deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
                                          ("cancel", grpc.StatusCode.CANCELLED)])
def test_no_model_runs_for_a_call_that_ended_before_it(model_base, monkeypatch, ending, code):
    """The call ends (deadline or client cancel) while the server resolves its model: the
    server must not start the model for it, and records the call's status. (gRPC itself
    never hands the servicer a call that ended while it waited for a worker thread.)"""
    server = ModelServer(ServerOptions(model_name="ifa", model_base_path=str(model_base),
                                       port=0, file_system_poll_wait_seconds=0))
    contexts, runs = [], []
    resolving, release = threading.Event(), threading.Event()
    original_predict = grpc_service.PredictionServicer.Predict
    original_resolve = ModelManager.resolve
    original_run = Signature.run

    def predict_keeping_the_call(self, request, context):
        contexts.append(context)
        return original_predict(self, request, context)

    def ended(context):
        # The client's own timer may cancel the stream a little before the server's deadline.
        return not context.is_active() and (ending == "cancel" or not context.time_remaining())

    def resolve_once_the_call_ended(self, *args, **kwargs):
        resolving.set()
        release.wait(30)
        gone_by = time.monotonic() + 10
        while not ended(contexts[-1]) and time.monotonic() < gone_by:
            time.sleep(0.01)
        return original_resolve(self, *args, **kwargs)

    def counted_run(self, *args, **kwargs):
        runs.append(self.name)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(grpc_service.PredictionServicer, "Predict", predict_keeping_the_call)
    server.start()
    monkeypatch.setattr(ModelManager, "resolve", resolve_once_the_call_ended)
    monkeypatch.setattr(Signature, "run", counted_run)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        if ending == "deadline":
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(small_request(), timeout=2)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert resolving.is_set()
        else:
            call = stub.Predict.future(small_request(), timeout=60)
            assert resolving.wait(30)
            call.cancel()
        release.set()
        series = f':tensorflow:serving:request_count{{model_name="ifa",status="{code.name}"}}'
        recorded_by = time.monotonic() + 30
        while series not in samples(server.metrics.render()) and time.monotonic() < recorded_by:
            time.sleep(0.05)
        assert runs == []
        assert samples(server.metrics.render())[series] == 1
    finally:
        release.set()
        channel.close()
        server.stop()


# ------------------------------------------------------------- echoes, versions, metrics
def test_errors_do_not_echo_a_request_s_bulk(server):
    """20,000 unknown input names, or a 100 KB model name: the answer is the error the
    request deserves, short, not the client's receive limit (RESOURCE_EXHAUSTED)."""
    request = small_request()
    for index in range(20_000):
        request.inputs[f"unknown_input_{index:05d}"].CopyFrom(proto([1], values=[1]))
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Sent extra: {unknown_input_00000," in raised.value.details()
    assert "19990 more" in raised.value.details()
    assert len(raised.value.details()) <= errors.MAX_MESSAGE_CHARS + 100
    request = small_request()
    request.model_spec.name = "x" * 100_000
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details().startswith("Servable not found for request: Latest(xxx")
    assert len(raised.value.details()) <= errors.MAX_MESSAGE_CHARS + 100


@pytest.mark.parametrize("suffix", ["", "/metadata"])
def test_rest_version_beyond_int64_is_not_found(server, suffix):
    version = 2**64 + 5
    status, answer = rest(server, f"/v1/models/ifa/versions/{version}{suffix}")
    assert status == 404, answer
    assert str(version) in answer["error"]
    assert "Traceback" not in server.logs()


def samples(text):
    """`{series: value}` of a Prometheus text exposition."""
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def scrape(server):
    url = f"http://{server.rest_target}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def test_metrics_cannot_be_forged_or_grown_by_model_names(server):
    forged = 'ifa",status="OK"} 1e9\n:tensorflow:serving:request_count{model_name="ifa'
    names = [forged, "a\\b", *(f"nope-{index}" for index in range(50))]
    unknown = (f':tensorflow:serving:request_count{{model_name="{metrics.UNKNOWN_MODEL}",'
               'status="NOT_FOUND"}')
    before = samples(scrape(server))
    for name in names:
        request = small_request()
        request.model_spec.name = name
        with pytest.raises(grpc.RpcError) as raised:
            server.predict_stub.Predict(request, timeout=60)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    text = scrape(server)
    assert "1e9" not in text and "nope-" not in text
    after = samples(text)
    assert after[unknown] - before.get(unknown, 0) == len(names)
    assert len(after) == len(before) + (unknown not in before) * (1 + 33 + 1 + 2)
    for line in text.splitlines():
        assert line.startswith(("# HELP :tensorflow:serving:request_",
                                "# TYPE :tensorflow:serving:request_",
                                ":tensorflow:serving:request_")), line
        assert 'model_name="ifa"' in line or f'model_name="{metrics.UNKNOWN_MODEL}"' in line \
            or line.startswith("#")


def test_metrics_escape_every_label_value():
    recorder = metrics.Metrics()  # records names as given
    recorder.record('a"b\\c\nd', "Predict", "GRPC", "OK", 0.001)
    lines = recorder.render().splitlines()
    assert ':tensorflow:serving:request_count{model_name="a\\"b\\\\c\\nd",status="OK"} 1.0' in lines
    # HELP and TYPE of both, the count, buckets, +Inf, sum, count
    assert len(lines) == 4 + 1 + 33 + 1 + 2
    known = metrics.Metrics(known_models=["ifa"])
    for name in ("ifa", "other", "another"):
        known.record(name, "Predict", "REST", "OK", 0.001)
    assert [line for line in known.render().splitlines() if "request_count{" in line] == [
        ':tensorflow:serving:request_count{model_name="ifa",status="OK"} 1.0',
        f':tensorflow:serving:request_count{{model_name="{metrics.UNKNOWN_MODEL}",'
        'status="OK"} 2.0']


def test_metrics_keep_tf_serving_names_types_and_buckets():
    """prometheus_client would write the count as `..._total` and `le="10.0"`; dashboards
    query TF Serving's names."""
    recorder = metrics.Metrics()
    for seconds in (0.000005, 0.0001, 0.0001, 3.0):
        recorder.record("ifa", "Predict", "REST", "OK", seconds)
    text = recorder.render()
    assert "# TYPE :tensorflow:serving:request_count untyped" in text
    assert "# TYPE :tensorflow:serving:request_latency histogram" in text
    assert "_total" not in text and "_created" not in text
    series = samples(text)
    labels = 'API="Predict",entrypoint="REST"'
    bounds = [f"{10 * 1.8 ** i:.6g}" for i in range(33)] + ["+Inf"]
    buckets = [series[f':tensorflow:serving:request_latency_bucket{{{labels},le="{bound}",'
                      'model_name="ifa"}'] for bound in bounds]
    assert bounds[:4] == ["10", "18", "32.4", "58.32"]
    # 5 us, 100 us (twice) and 3 s, cumulative: 1 from 10 us, 3 from 104.976, 4 from 4.13e6.
    assert buckets == [1] * 4 + [3] * 18 + [4] * 12
    assert series[f':tensorflow:serving:request_latency_count{{{labels},model_name="ifa"}}'] == 4
    assert series[f':tensorflow:serving:request_latency_sum{{{labels},model_name="ifa"}}'] == (
        pytest.approx(5 + 100 + 100 + 3e6))


# ------------------------------------------------------------------- non-finite outputs
NAN_USER = 13


def nan_for_one_user(model):
    """`model`, but every task and the score are NaN for the user `NAN_USER` (finite
    weights: what a broken model can do to some requests)."""
    features = model.input
    outputs = model(features)
    broken = keras.ops.expand_dims(keras.ops.equal(features["user_id"], NAN_USER), -1)
    return keras.Model(features, {name: keras.ops.where(broken, np.float32("nan"), value)
                                  for name, value in outputs.items()})


def test_rank_candidates_puts_nan_scores_after_valid_ones_and_before_padding():
    score = tf.constant([[np.nan, 0.2, 0.9, np.nan, 0.5], [np.nan] * 5], tf.float32)
    ids = tf.constant([[11, 0, 13, 14, 15], [0, 22, 0, 24, 25]], tf.int64)
    indices, item_ids = export.rank_candidates(score, ids)
    np.testing.assert_array_equal(indices.numpy(), [[2, 4, 0, 3, 1], [1, 3, 4, 0, 2]])
    np.testing.assert_array_equal(item_ids.numpy(), [[13, 15, 11, 14, 0], [22, 24, 25, 0, 0]])


def test_a_model_computing_nan_never_answers_ok(tmp_path):
    base = tmp_path / "nan"
    model = nan_for_one_user(build_model("avg_pooling", 0))
    export.export_saved_model(model, base, schema=SCHEMA, warmup_shapes=())
    features = make_features(2, 4, 6, seed=0)
    features["user_id"][:] = [NAN_USER, NAN_USER + 1]
    saved = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    ranked = saved(**{k: tf.constant(v) for k, v in features.items()})["ranked_item_ids"]
    for row in range(2):  # the contract holds in TF Serving too: valid first, then padding
        valid = features["cand_item_id"][row]
        count = int(np.count_nonzero(valid))
        np.testing.assert_array_equal(np.sort(ranked[row, :count]), np.sort(valid[valid != 0]))
        assert not np.any(ranked[row, count:])

    server = ModelServer(ServerOptions(model_name="nan", model_base_path=str(base), port=0,
                                       rest_api_port=free_port(),
                                       file_system_poll_wait_seconds=0)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request(features, name="nan"), timeout=60)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert raised.value.details().startswith(
            "Model nan version 1 computed non-finite values: output click holds 4 NaN or "
            "infinite values of 8")
        fine = {k: v[1:] for k, v in features.items()}
        assert stub.Predict(predict_request(fine, name="nan"), timeout=60).outputs
        body = json.dumps({"inputs": {k: v.tolist() for k, v in features.items()}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.rest_port}/v1/models/nan:predict", data=body)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)
        assert raised.value.code == 500
        assert "non-finite" in json.loads(raised.value.read())["error"]  # strict JSON
    finally:
        channel.close()
        server.stop()


def test_a_model_computing_nan_fails_its_warm_up_and_is_never_served(tmp_path):
    """A diverged model exported as it is: its warm-up request computes NaN, so the version
    ends in END with a message naming it and the output, and nothing is served."""
    model = build_model("avg_pooling", 0)
    always_nan = keras.Model(model.input, {name: value * np.float32("nan")
                                           for name, value in model(model.input).items()})
    export.export_saved_model(always_nan, tmp_path / "nan", schema=SCHEMA,
                              warmup_shapes=((1, 3, 4),))
    manager = ModelManager([ModelConfig("nan", str(tmp_path / "nan"))], poll_wait_seconds=0,
                           max_load_retries=0)
    manager.start()
    manager.poll()  # no retries left: a later poll leaves it alone
    [(version, state, message)] = manager.status("nan")
    assert (version, state) == (1, State.END)
    assert message.startswith(
        "Failed to load servable version 1 of nan: INTERNAL: Model nan version 1 computed "
        "non-finite values: output click holds 3 NaN or infinite values of 3"), message
    with pytest.raises(errors.ServingError) as raised:
        manager.resolve("nan")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    manager.stop()
