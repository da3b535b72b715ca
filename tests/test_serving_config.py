"""ifa-serve's configuration and model manager, in process: models.config parsing (the kit's
own files included), version policies, polling, failed loads, options validation."""

import os
import threading
import time

import grpc
import keras
import numpy as np
import pytest
import yaml

import ifa_tf
from ifa_tf import export
from ifa_tf.schema import FeatureSchema
from ifa_tf.serving import GrpcClient, ServingError, errors
from ifa_tf.serving.client import Ranking
from ifa_tf.serving.model_manager import (Limits, ModelConfig, ModelManager, Signature, State,
                                          read_model_config_file)
from ifa_tf.serving.metrics import read_monitoring_config
from ifa_tf.serving.query import format_ranking
from ifa_tf.serving.server import ModelServer, ServerOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = FeatureSchema(embedding_buckets={"user_id": 7, "item_id": 11, "category_id": 5,
                                          "author_id": 5})


def test_kit_models_config_parses():
    [model] = read_model_config_file(os.path.join(REPO, "serving", "models.config"))
    assert model == ModelConfig("ifa", "/models/ifa", ("latest", 1), {})


def test_kubernetes_configmap_models_config_parses(tmp_path):
    with open(os.path.join(REPO, "serving", "k8s", "configmap.yaml")) as f:
        configmap = yaml.safe_load(f)
    path = tmp_path / "models.config"
    path.write_text(configmap["data"]["models.config"])
    assert [m.name for m in read_model_config_file(path)] == ["ifa"]
    with open(os.path.join(REPO, "serving", "k8s", "deployment.yaml")) as f:
        deployment = yaml.safe_load(f)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/ifa/metadata"


def test_models_config_policies_labels_and_relative_paths(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("""
model_config_list {
  config { name: "a" base_path: "a_models" model_platform: "tensorflow"
           model_version_policy { specific { versions: 3 versions: 5 } }
           version_labels { key: "stable" value: 3 } }
  config { name: "b" base_path: "/abs/b" model_version_policy { all {} } }
  config { name: "c" base_path: "/abs/c" model_version_policy { latest { num_versions: 2 } } }
}""")
    a, b, c = read_model_config_file(path)
    assert a == ModelConfig("a", str(tmp_path / "a_models"), ("specific", (3, 5)),
                            {"stable": 3})
    assert a.select([1, 3, 4, 5]) == [3, 5]
    assert b.select([2, 1]) == [1, 2]
    assert c.select([1, 7, 3]) == [3, 7]
    assert c.select([]) == []


@pytest.mark.parametrize("text, message", [
    ("model_config_list { config { name: 'a' } }", "needs a name and a base_path"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'onnx' } }",
     "only model_platform"),
    ("model_config_list { config { name: 'a' base_path: '/x' } config { name: 'a' "
     "base_path: '/y' } }", "names a model twice"),
    ("model_config_list { bogus: 1 }", "Invalid model config file"),
])
def test_models_config_errors(tmp_path, text, message):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_model_config_file(path)


def test_monitoring_config(tmp_path):
    assert read_monitoring_config(os.path.join(REPO, "serving", "monitoring.config")) == (
        "/monitoring/prometheus/metrics")
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: false }")
    assert read_monitoring_config(path) is None
    path.write_text("prometheus_config { enable: true }")
    assert read_monitoring_config(path) == "/monitoring/prometheus/metrics"
    path.write_text("logging_config {}")
    with pytest.raises(ValueError, match="prometheus_config"):
        read_monitoring_config(path)


def test_server_options_are_validated():
    with pytest.raises(ValueError, match="exactly one of --model_base_path"):
        ServerOptions()
    with pytest.raises(ValueError, match="--port must be in"):
        ServerOptions(model_base_path="/m", port=70000)
    with pytest.raises(ValueError, match="--max_candidates must be >= 0"):
        ServerOptions(model_base_path="/m", max_candidates=-1)
    assert ServerOptions(model_base_path="/m").host == "127.0.0.1"


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return ifa_tf.zoo.build("avg_pooling", schema=SCHEMA)


def test_manager_serves_latest_and_keeps_old_version_when_new_one_is_broken(tiny_model,
                                                                             tmp_path):
    base = tmp_path / "m"
    export.export_saved_model(tiny_model, base, schema=SCHEMA, warmup_shapes=((1, 3, 4),))
    (base / ".tmp-export-2-abc").mkdir()  # an export in progress is not a version
    manager = ModelManager([ModelConfig("m", str(base))], poll_wait_seconds=0,
                           max_load_retries=0, limits=Limits(max_candidates=10))
    manager.start()
    assert manager.resolve("m").version == 1
    broken = base / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    manager.poll()
    assert manager.resolve("m").version == 1  # still served
    states = {version: (state, message) for version, state, message in manager.status("m")}
    assert states[1] == (State.AVAILABLE, "")
    assert states[2][0] == State.END and "Failed to load servable version 2" in states[2][1]
    os.rename(broken, base / "broken")
    os.rename(base / "1", base / "3")
    manager.poll()
    assert manager.resolve("m").version == 3
    assert (1, State.END, "") in manager.status("m")
    with pytest.raises(errors.ServingError) as raised:
        manager.resolve("m", version=1)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    features = export.random_features(export.serving_specs(tiny_model), 1, 11, 4)
    with pytest.raises(errors.ServingError, match="--max_candidates=10"):
        manager.resolve("m").signature(None).run(features, limits=manager.limits)
    manager.stop()


def test_format_ranking_lists_the_top_candidates():
    ranking = Ranking(item_ids=np.array([7, 3]), indices=np.array([1, 0]),
                      scores={"score": np.array([0.9, 0.2]), "click": np.array([0.9, 0.2]),
                              "impression": np.array([0.95, 0.5])}, version=4)
    text = format_ranking(ranking, top=1, tasks=("impression", "click"))
    lines = text.splitlines()
    assert lines[0] == "model version 4: 2 candidates ranked"
    assert lines[1].split() == ["rank", "item", "score", "impression", "click"]
    assert lines[2].split() == ["1", "7", "0.900000", "0.950000", "0.900000"]
    assert len(lines) == 3
    # A 19-digit hashed id keeps its column; raw ids (serving_raw, or a vocabulary) show.
    ranking.item_ids = np.array([7773062992425985897, 3])
    lines = format_ranking(ranking, top=2, tasks=("click",)).splitlines()
    assert lines[2].split()[:2] == ["1", "7773062992425985897"]
    assert lines[2].index("0.900000") == lines[3].index("0.200000")
    names = {7773062992425985897: "Heat (1995)"}
    assert "1  Heat (1995)  0.9" in format_ranking(ranking, 1, ("click",), names)
    ranking.raw_item_ids = ["Up (2009)", "Heat (1995)"]
    assert "1  Up (2009)    0.9" in format_ranking(ranking, 2, ("click",))


def test_stop_lets_in_flight_requests_finish_and_refuses_new_ones(tiny_model, tmp_path,
                                                                  monkeypatch):
    """What SIGTERM runs: a request already executing completes; later ones are refused."""
    export.export_saved_model(tiny_model, tmp_path / "m", schema=SCHEMA, warmup_shapes=())
    server = ModelServer(ServerOptions(model_name="m", model_base_path=str(tmp_path / "m"),
                                       port=0, file_system_poll_wait_seconds=0)).start()
    started = threading.Event()
    original_run = Signature.run

    def slow_run(self, *args, **kwargs):
        started.set()
        time.sleep(1.0)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "run", slow_run)
    features = export.random_features(export.serving_specs(tiny_model), 1, 5, 7)
    target = f"127.0.0.1:{server.grpc_port}"
    outcome = {}

    def query():
        with GrpcClient(target, "m", timeout=30) as client:
            outcome["rankings"] = client.rank(features)

    thread = threading.Thread(target=query)
    thread.start()
    assert started.wait(30)
    server.stop()
    thread.join()
    assert len(outcome["rankings"]) == 1 and len(outcome["rankings"][0].item_ids) > 0
    with GrpcClient(target, "m", timeout=5) as client:
        with pytest.raises(ServingError) as raised:
            client.rank(features)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
