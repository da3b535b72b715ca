"""`ifa-serve` end to end: a real subprocess on loopback, queried over gRPC with TF Serving's
own stubs and over REST; TF Serving's error codes; the client; hot reload under load;
SIGTERM shutdown."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

import ifa_tf
from ifa_tf import export
from ifa_tf.benchmark.requests import random_request
from ifa_tf.schema import FeatureSchema
from ifa_tf.serving import GrpcClient, RestClient, ServingError, connect

SCHEMA = FeatureSchema(embedding_buckets={"user_id": 31, "item_id": 101, "category_id": 13,
                                          "author_id": 17})
MAX_CANDIDATES, MAX_SEQUENCE_LENGTH, MAX_REQUEST_BYTES = 64, 256, 1_000_000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_features(batch, m, n, seed):
    features = random_request(SCHEMA, m, n, batch=batch, seed=seed)
    for row in range(batch):
        for name in SCHEMA.candidate_features + SCHEMA.cross_features:
            features[name][row, m - 1 - row:] = 0
        for name in SCHEMA.sequence_features:
            features[name][row, n - 2 - row:] = 0
    return features


def keras_outputs(model, features):
    outputs = {k: np.asarray(v) for k, v in model(features, training=False).items()}
    key = np.where(features["cand_item_id"] != 0, -outputs["score"].astype(np.float64), np.inf)
    outputs["ranked_indices"] = np.argsort(key, axis=1, kind="stable")
    outputs["ranked_item_ids"] = np.take_along_axis(features["cand_item_id"],
                                                    outputs["ranked_indices"], axis=1)
    return outputs


def assert_outputs_match(actual, expected):
    assert set(actual) == set(expected)
    for name in SCHEMA.tasks + ("score",):
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-5, rtol=0)
    # Ranking: identical except where float noise swaps near-ties.
    ranked_scores = np.take_along_axis(expected["score"], actual["ranked_indices"], axis=1)
    for row in range(ranked_scores.shape[0]):
        count = int(np.count_nonzero(actual["ranked_item_ids"][row]))
        assert count == int(np.count_nonzero(expected["ranked_item_ids"][row]))
        assert np.all(np.diff(ranked_scores[row, :count]) <= 1e-5)
        np.testing.assert_array_equal(np.sort(actual["ranked_item_ids"][row]),
                                      np.sort(expected["ranked_item_ids"][row]))


def build_model(name, seed):
    keras.utils.set_random_seed(seed)
    return ifa_tf.zoo.build(name, schema=SCHEMA)


class ServeProcess:
    """An `ifa-serve` subprocess: `start(log_path, flags, names)` runs it with `flags` (ports
    added) and waits until the models `names` answer over gRPC and the first over REST."""

    def start(self, log_path, flags, names=("ifa",)):
        self.port, self.rest_port = free_port(), free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ifa_tf.cli.serve", f"--port={self.port}",
             f"--rest_api_port={self.rest_port}", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        self.target = f"127.0.0.1:{self.port}"
        self.rest_target = f"127.0.0.1:{self.rest_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._wait_ready(names=names)

    def _wait_ready(self, timeout=180, names=("ifa",)):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ifa-serve exited with {self.process.returncode}:\n{self.logs()}")
            try:
                for name in names:
                    request = get_model_status_pb2.GetModelStatusRequest()
                    request.model_spec.name = name
                    self.model_stub.GetModelStatus(request, timeout=2)
                urllib.request.urlopen(f"http://{self.rest_target}/v1/models/{names[0]}",
                                       timeout=2)
                return
            except (grpc.RpcError, OSError):
                time.sleep(0.3)
        pytest.fail(f"ifa-serve not ready after {timeout}s:\n{self.logs()}")

    def logs(self):
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self):
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()
        return returncode


class Server(ServeProcess):
    """An `ifa-serve` subprocess and what the tests need to talk to it."""

    def __init__(self, tmp_path):
        self.base = tmp_path / "models"
        self.models = {"ifa": build_model("ifa", 0), "reload_v1": build_model("avg_pooling", 1)}
        export.export_saved_model(self.models["ifa"], self.base / "ifa", schema=SCHEMA,
                                  warmup_shapes=((1, 8, 16),))
        export.export_saved_model(self.models["reload_v1"], self.base / "reload",
                                  schema=SCHEMA, warmup_shapes=())
        self.config_file = tmp_path / "models.config"
        self.config_file.write_text(f"""
model_config_list {{
  config {{
    name: "ifa"
    base_path: "{self.base / 'ifa'}"
    model_platform: "tensorflow"
    version_labels {{ key: "stable" value: 1 }}
  }}
  config {{
    name: "reload"
    base_path: "{self.base / 'reload'}"
    model_platform: "tensorflow"
  }}
}}
""")
        self.start(tmp_path / "ifa-serve.log", [
            f"--model_config_file={self.config_file}", "--file_system_poll_wait_seconds=0.2",
            f"--max_candidates={MAX_CANDIDATES}", f"--max_sequence_length={MAX_SEQUENCE_LENGTH}",
            f"--max_request_bytes={MAX_REQUEST_BYTES}", "--grpc_max_threads=8",
            f"--monitoring_config_file={os.path.join(REPO, 'serving', 'monitoring.config')}"],
            names=("ifa", "reload"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serving"))
    yield server
    returncode = server.stop()
    logs = server.log_path.read_text()
    assert returncode == 0, logs[-5000:]
    assert "Server stopped" in logs


def predict_request(features, name="ifa", signature_name="serving_default", version=None,
                    label=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for key, value in features.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def response_arrays(response):
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def rest(server, path, body=None):
    """(HTTP status, parsed JSON) of a REST call."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.rest_target}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---------------------------------------------------------------------------------- gRPC
def outward_address():
    """This host's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_listens_on_loopback_only(server):
    assert f"Running gRPC ModelServer at 127.0.0.1:{server.port}" in server.logs()
    address = outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback address")
    for port in (server.port, server.rest_port):
        with socket.socket() as sock, pytest.raises(OSError):
            sock.settimeout(2)
            sock.connect((address, port))


def test_grpc_predict_gives_the_keras_ranking(server):
    features = make_features(2, 20, 40, seed=0)
    response = server.predict_stub.Predict(predict_request(features), timeout=30)
    assert response.model_spec.name == "ifa"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert_outputs_match(response_arrays(response),
                         keras_outputs(server.models["ifa"], features))


def test_grpc_version_label_and_specific_version(server):
    features = make_features(1, 5, 9, seed=1)
    for spec in ({"version": 1}, {"label": "stable"}):
        response = server.predict_stub.Predict(predict_request(features, **spec), timeout=30)
        assert response.model_spec.version.value == 1


def test_grpc_output_filter(server):
    features = make_features(1, 6, 9, seed=2)
    response = server.predict_stub.Predict(
        predict_request(features, output_filter=["ranked_item_ids", "click"]), timeout=30)
    assert set(response.outputs) == {"ranked_item_ids", "click"}
    expected = keras_outputs(server.models["ifa"], features)
    np.testing.assert_allclose(response_arrays(response)["click"], expected["click"], atol=1e-5)


def _drop(name):
    def mutate(features):
        del features[name]
    return mutate


def _add(name, like):
    def mutate(features):
        features[name] = features[like]
    return mutate


def _set(name, function):
    def mutate(features):
        features[name] = function(features[name])
    return mutate


ERROR_CASES = {
    "unknown model": (dict(name="nope"), None, grpc.StatusCode.NOT_FOUND,
                      "Servable not found for request: Latest(nope)"),
    "unknown version": (dict(version=9), None, grpc.StatusCode.NOT_FOUND,
                        "Servable not found for request: Specific(ifa, 9)"),
    "unknown label": (dict(label="canary"), None, grpc.StatusCode.INVALID_ARGUMENT,
                      "Unrecognized servable version label: canary"),
    "unknown signature": (dict(signature_name="nope"), None,
                          grpc.StatusCode.FAILED_PRECONDITION,
                          'Serving signature key "nope" not found.'),
    "wrong dtype": ({}, _set("cand_item_id", lambda v: v.astype(np.float32)),
                    grpc.StatusCode.INVALID_ARGUMENT, "to be int64 but float is provided"),
    "wrong rank": ({}, _set("user_id", lambda v: v[:, None]),
                   grpc.StatusCode.INVALID_ARGUMENT, "Input user_id must have rank 1"),
    "missing input": ({}, _drop("seq_action"), grpc.StatusCode.INVALID_ARGUMENT,
                      "Missing but required: {seq_action}."),
    "extra input": ({}, _add("cand_bogus", like="cand_item_id"),
                    grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {cand_bogus}."),
    "inconsistent batch": ({}, _set("user_id", lambda v: v[:1]),
                           grpc.StatusCode.INVALID_ARGUMENT, "Inconsistent batch size"),
    "inconsistent m": ({}, _set("cand_cross_author_count", lambda v: v[:, :-1]),
                       grpc.StatusCode.INVALID_ARGUMENT, "Inconsistent candidate count m"),
    "unknown output": (dict(output_filter=["bogus"]), None, grpc.StatusCode.INVALID_ARGUMENT,
                       "output tensor alias not found in signature: bogus"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_grpc_error_codes(server, case):
    spec, mutate, code, message = ERROR_CASES[case]
    features = make_features(2, 6, 10, seed=3)
    if mutate is not None:
        mutate(features)
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(predict_request(features, **spec), timeout=30)
    assert raised.value.code() == code, raised.value.details()
    assert message in raised.value.details()


def test_grpc_limits(server):
    too_many_candidates = make_features(1, MAX_CANDIDATES + 1, 10, seed=4)
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(predict_request(too_many_candidates), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (f"candidate count m {MAX_CANDIDATES + 1} exceeds this server's limit "
            f"--max_candidates={MAX_CANDIDATES}") in raised.value.details()
    too_long = make_features(1, 4, MAX_SEQUENCE_LENGTH + 1, seed=4)
    with pytest.raises(grpc.RpcError, match="max_sequence_length"):
        server.predict_stub.Predict(predict_request(too_long), timeout=30)
    too_big = make_features(1, 4, MAX_REQUEST_BYTES // 8, seed=4)
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.Predict(predict_request(too_big), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_model_metadata(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "ifa"
    request.metadata_field.append("signature_def")
    response = server.predict_stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert set(signature.inputs) == set(SCHEMA.feature_names)
    assert signature.method_name == "tensorflow/serving/predict"
    assert {"ranked_item_ids", "ranked_indices", "score"} <= set(signature.outputs)
    del request.metadata_field[:]
    with pytest.raises(grpc.RpcError) as raised:
        server.predict_stub.GetModelMetadata(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_model_status(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ifa"
    response = server.model_stub.GetModelStatus(request, timeout=30)
    [status] = response.model_version_status
    assert (status.version, status.state, status.status.error_code) == (
        1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
    request.model_spec.name = "nope"
    with pytest.raises(grpc.RpcError) as raised:
        server.model_stub.GetModelStatus(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------- REST
def test_rest_status(server):
    status, body = rest(server, "/v1/models/ifa")
    assert status == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
        "error_code": "OK", "error_message": ""}}]}
    status, body = rest(server, "/v1/models/ifa/versions/3")
    assert status == 404 and "Could not find version 3 of model ifa" in body["error"]


def test_rest_predict_equals_grpc(server):
    features = make_features(2, 12, 30, seed=5)
    grpc_outputs = response_arrays(server.predict_stub.Predict(predict_request(features),
                                                               timeout=30))
    columnar = {key: value.tolist() for key, value in features.items()}
    status, body = rest(server, "/v1/models/ifa:predict", {"inputs": columnar})
    assert status == 200
    for key, value in grpc_outputs.items():
        np.testing.assert_array_equal(np.asarray(body["outputs"][key], value.dtype), value)
    instances = [{key: value[row].tolist() for key, value in features.items()}
                 for row in range(2)]
    status, body = rest(server, "/v1/models/ifa/versions/1:predict",
                        {"signature_name": "serving_default", "instances": instances})
    assert status == 200 and len(body["predictions"]) == 2
    for row, prediction in enumerate(body["predictions"]):
        for key, value in grpc_outputs.items():
            np.testing.assert_array_equal(np.asarray(prediction[key], value.dtype), value[row])


def test_rest_errors(server):
    columnar = {key: value.tolist() for key, value in make_features(1, 4, 6, seed=6).items()}
    status, body = rest(server, "/v1/models/nope:predict", {"inputs": columnar})
    assert status == 404 and body["error"] == "Servable not found for request: Latest(nope)"
    status, body = rest(server, "/v1/models/ifa:predict",
                        {"signature_name": "nope", "inputs": columnar})
    assert status == 400 and 'Serving signature key "nope" not found.' in body["error"]
    floats = dict(columnar, cand_item_id=[[0.5, 1.5, 2.5, 3.5]])
    status, body = rest(server, "/v1/models/ifa:predict", {"inputs": floats})
    assert status == 400 and "cand_item_id expects int64" in body["error"]
    ragged = [dict(columnar, cand_item_id=[1, 2]), columnar]
    status, body = rest(server, "/v1/models/ifa:predict", {"instances": ragged})
    assert status == 400
    status, body = rest(server, "/v1/models/ifa:predict", {"inputs": columnar,
                                                           "instances": []})
    assert status == 400 and "only have one of" in body["error"]


def prometheus_samples(server):
    """`{series: value}` scraped from the metrics path of the kit's monitoring.config."""
    url = f"http://{server.rest_target}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def test_prometheus_metrics_count_and_time_predict_calls(server):
    ok = ':tensorflow:serving:request_count{model_name="ifa",status="OK"}'
    # A model the server does not serve is counted under one label value.
    not_found = (':tensorflow:serving:request_count{model_name="__unknown__",'
                 'status="NOT_FOUND"}')
    # prometheus_client writes labels in sorted order (their order means nothing to Prometheus).
    grpc_count = (':tensorflow:serving:request_latency_count{API="Predict",entrypoint="GRPC",'
                  'model_name="ifa"}')
    rest_count = grpc_count.replace("GRPC", "REST")
    before = prometheus_samples(server)
    features = make_features(1, 5, 9, seed=12)
    server.predict_stub.Predict(predict_request(features), timeout=30)
    with pytest.raises(grpc.RpcError):
        server.predict_stub.Predict(predict_request(features, name="nope"), timeout=30)
    status, _ = rest(server, "/v1/models/ifa:predict",
                     {"inputs": {k: v.tolist() for k, v in features.items()}})
    assert status == 200
    after = prometheus_samples(server)
    assert after[ok] - before.get(ok, 0) == 2
    assert after[not_found] - before.get(not_found, 0) == 1
    assert after[grpc_count] - before.get(grpc_count, 0) == 1
    assert after[rest_count] - before.get(rest_count, 0) == 1
    infinity_bucket = rest_count.replace("_count{", "_bucket{").replace(
        ",model_name", ',le="+Inf",model_name')
    assert after[infinity_bucket] == after[rest_count]


# -------------------------------------------------------------------------------- client
def test_client_rankings_agree_over_grpc_and_rest(server):
    features = make_features(3, 15, 25, seed=7)
    expected = keras_outputs(server.models["ifa"], features)
    with GrpcClient(server.target, "ifa") as grpc_client, \
            connect(server.rest_target, "ifa", protocol="rest") as rest_client:
        via_grpc = grpc_client.rank(features)
        via_rest = rest_client.rank(features)
        single = grpc_client.rank_user({k: v[0] for k, v in features.items()})
    assert len(via_grpc) == len(via_rest) == 3
    for row, (a, b) in enumerate(zip(via_grpc, via_rest)):
        valid = int(np.count_nonzero(features["cand_item_id"][row]))
        assert a.version == 1 and len(a.item_ids) == valid and np.all(a.item_ids != 0)
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_array_equal(a.item_ids, features["cand_item_id"][row][a.indices])
        np.testing.assert_array_equal(a.item_ids, expected["ranked_item_ids"][row, :valid])
        assert set(a.scores) == {*SCHEMA.tasks, "score"}
        np.testing.assert_allclose(a.scores["click"], expected["click"][row][a.indices],
                                   atol=1e-5)
        np.testing.assert_array_equal(a.scores["score"], b.scores["score"])
        assert np.all(np.diff(a.scores["score"]) <= 0)
    np.testing.assert_array_equal(single.item_ids, via_grpc[0].item_ids)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_client_errors_carry_the_server_status(server, protocol):
    target = server.target if protocol == "grpc" else server.rest_target
    features = make_features(1, 4, 6, seed=8)
    with connect(target, "nope", protocol=protocol) as client:
        with pytest.raises(ServingError) as raised:
            client.rank(features)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.message == "Servable not found for request: Latest(nope)"
    with connect(target, "ifa", protocol=protocol, version=5) as client:
        with pytest.raises(ServingError, match=r"Specific\(ifa, 5\)"):
            client.rank(features)
    with connect(target, "ifa", protocol=protocol) as client:
        with pytest.raises(ServingError) as raised:
            client.rank(make_features(1, 4, 6, seed=8), timeout=1e-6)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ValueError, match="integer ids"):
            client.rank(dict(features, cand_item_id=features["cand_item_id"] * 0.5))


def test_client_against_a_dead_server_is_unavailable():
    with GrpcClient(f"127.0.0.1:{free_port()}", "ifa", timeout=2) as client:
        with pytest.raises(ServingError) as raised:
            client.rank(make_features(1, 4, 6, seed=9))
    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE,
                                 grpc.StatusCode.DEADLINE_EXCEEDED)
    with RestClient(f"127.0.0.1:{free_port()}", "ifa", timeout=2) as client:
        with pytest.raises(ServingError) as raised:
            client.model_status()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- hot reload
def test_hot_reload_under_concurrent_load(server):
    """Writing version 2 while clients query: v2 answers follow, and no request fails."""
    features = make_features(2, 10, 20, seed=10)
    expected = {1: keras_outputs(server.models["reload_v1"], features)}
    stop = threading.Event()
    results, failures = [], []

    def query():
        with GrpcClient(server.target, "reload", timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    outputs, version = client.predict(features)
                except ServingError as error:
                    failures.append(error)
                    continue
                results.append((started, time.monotonic(), version, outputs))

    threads = [threading.Thread(target=query) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        v2 = build_model("avg_pooling", 2)
        expected[2] = keras_outputs(v2, features)
        export.export_saved_model(v2, server.base / "reload", schema=SCHEMA,
                                  warmup_shapes=((1, 8, 16),))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r[2] == 2 for r in results):
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    versions = [r[2] for r in results]
    assert versions.count(1) > 0 and versions.count(2) > 0, server.logs()
    first_v2_done = min(done for _, done, version, _ in results if version == 2)
    assert all(version == 2 for started, _, version, _ in results if started > first_v2_done)
    for _, _, version, outputs in results[::10]:
        assert_outputs_match(outputs, expected[version])
    with GrpcClient(server.target, "reload") as client:
        assert client.model_status() == [(1, "END", ""), (2, "AVAILABLE", "")]


# ----------------------------------------------------------------------------- benchmark
def test_load_benchmark_counts_requests_and_errors(server):
    spec = importlib.util.spec_from_file_location(
        "serving_load", os.path.join(REPO, "benchmarks", "serving_load.py"))
    serving_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving_load)
    features = make_features(1, 16, 32, seed=11)
    result = serving_load.run_load(
        lambda: GrpcClient(server.target, "ifa"), features, clients=2, duration_s=1.0)
    assert result.errors == 0 and result.requests > 0
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.requests_per_s == pytest.approx(result.requests / result.duration_s)
    failing = serving_load.run_load(
        lambda: GrpcClient(server.target, "nope"), features, clients=1, duration_s=0.3)
    assert failing.errors > 0 and failing.requests == 0
