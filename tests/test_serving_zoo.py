"""The zoo's newest models (`sam`, `twin_v2`, `dare`, `mirrn`) exported and served by one
`ifa-serve`: each answers TF Serving's Predict with the Keras model's scores and ranking."""

import keras
import pytest

import ifa_tf
from ifa_tf import export
from test_serving import (SCHEMA, ServeProcess, assert_outputs_match, keras_outputs,
                          make_features, predict_request, response_arrays)

# Small, so that exporting four models stays a few seconds each.
MODELS = {"sam": {}, "twin_v2": {"k": 8}, "dare": {"k": 8}, "mirrn": {"k": 8}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("serving_zoo")
    models, configs = {}, []
    for index, (name, overrides) in enumerate(MODELS.items()):
        keras.utils.set_random_seed(index)
        models[name] = ifa_tf.zoo.build(name, schema=SCHEMA, embedding_dim=8,
                                        tower_units=[16], **overrides)
        base = tmp_path / name
        export.export_saved_model(models[name], base, schema=SCHEMA, warmup_shapes=())
        configs.append(f'config {{ name: "{name}" base_path: "{base}" '
                       'model_platform: "tensorflow" }')
    config_file = tmp_path / "models.config"
    config_file.write_text("model_config_list {\n" + "\n".join(configs) + "\n}\n")
    server = ServeProcess()
    server.start(tmp_path / "ifa-serve.log", [f"--model_config_file={config_file}"],
                 names=tuple(MODELS))
    yield server, models
    assert server.stop() == 0, server.logs()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_served_model_gives_the_keras_ranking(served, name):
    server, models = served
    features = make_features(2, 12, 30, seed=3)
    response = server.predict_stub.Predict(predict_request(features, name=name), timeout=60)
    assert response.model_spec.name == name
    assert_outputs_match(response_arrays(response), keras_outputs(models[name], features))
