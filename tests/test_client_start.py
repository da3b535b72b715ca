"""Clients without TensorFlow: a cold `ifa-query` or Python client answers a warm server in
well under 3 s (TensorFlow alone takes 5-30 s to import); the protos' conversions equal
TensorFlow's; `import ifa_tf` is light and still registers the zoo with Keras; a TensorFlow
imported after the protos is whole."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from ifa_tf import export
from ifa_tf.serving import protos
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_raw_ids import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
       "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}


def run_python(code):
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout, time.perf_counter() - started


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.int64).reshape(2, 3), np.zeros((2, 0), np.int64),
    np.float32([[0.5, -1.5]]), np.array([["a", "é"], ["", "x y"]], dtype=object),
    np.int64(7), np.array([True, False]), np.float64([1e300]), np.int32([3])])
def test_proto_conversions_equal_tensorflows(array):
    mine, reference = protos.make_tensor_proto(array), tf.make_tensor_proto(array)
    assert (mine.dtype, mine.tensor_shape) == (reference.dtype, reference.tensor_shape)
    for proto in (mine, reference):
        expected, actual = tf.make_ndarray(proto), protos.make_ndarray(proto)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)


def test_proto_value_lists_are_read_as_tensorflow_reads_them():
    filled = tf.make_tensor_proto(np.float32(3.0), shape=[4])  # one value fills the shape
    np.testing.assert_array_equal(protos.make_ndarray(filled), [3.0] * 4)
    listed = tf.make_tensor_proto(np.int64([5, 6, 7]))
    listed.ClearField("tensor_content")
    listed.int64_val.extend([5, 6, 7])
    np.testing.assert_array_equal(protos.make_ndarray(listed), tf.make_ndarray(listed))
    with pytest.raises(ValueError, match="Cannot send dtype complex64"):
        protos.make_tensor_proto(np.complex64([1j]))


def test_import_ifa_tf_is_light_and_keras_still_finds_the_zoo():
    out, _ = run_python(
        "import sys, time\n"
        "import ifa_tf\n"
        "from ifa_tf.serving import GrpcClient, RestClient\n"
        "from ifa_tf.serving import protos\n"
        "from ifa_tf import _deferred\n"
        "print(_deferred.is_loaded('tensorflow'), 'keras' in sys.modules)\n"
        "import keras\n"
        "print(keras.saving.get_registered_object('ifa_tf>CandidateSetRanker') is not None)\n"
        "import tensorflow as tf\n"  # whole, with the protos imported before it
        "print(tf.make_tensor_proto([1]).__class__ is protos.tensor_pb2.TensorProto,"
        " tf.compat.v1.constant(2).numpy())\n")
    assert out.split() == ["False", "False", "True", "True", "2"]


def test_a_layer_imported_first_still_registers_every_model():
    out, _ = run_python("from ifa_tf.layers import HashedEmbedding\nimport keras\n"
                        "print(keras.saving.get_registered_object("
                        "'ifa_tf>CandidateSetRanker') is not None)\n")
    assert out.split() == ["True"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import keras

    import ifa_tf
    from test_serving import SCHEMA

    keras.utils.set_random_seed(0)
    base = tmp_path_factory.mktemp("client_start") / "ifa"
    export.export_saved_model(ifa_tf.zoo.build("avg_pooling", schema=SCHEMA), base,
                              schema=SCHEMA, warmup_shapes=((1, 4, 6),))
    server = ModelServer(ServerOptions(port=0, rest_api_port=free_port(), model_name="ifa",
                                       model_base_path=str(base))).start()
    from ifa_tf.serving import GrpcClient
    from ifa_tf.serving.query import wait_until_available

    with GrpcClient(f"127.0.0.1:{server.grpc_port}", "ifa") as client:
        wait_until_available(client, 60)
    yield server, os.path.join(str(base), "1")
    server.stop()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_cold_ifa_query_answers_in_under_3_s_without_tensorflow(served, protocol):
    server, version_dir = served
    target = server.rest_port if protocol == "rest" else server.grpc_port
    out, seconds = run_python(
        "import sys, ifa_tf_console\n"
        "try:\n"
        "    ifa_tf_console.run_command('ifa-query', sys.argv[1:])\n"
        "except SystemExit as exit_info:\n"
        "    assert not exit_info.code, exit_info.code\n"
        "from ifa_tf import _deferred\n"
        "print(_deferred.is_loaded('tensorflow'), 'keras' in sys.modules)\n".replace(
            "sys.argv[1:]", repr(["ifa-query", f"--target=127.0.0.1:{target}",
                                  f"--protocol={protocol}", f"--export_dir={version_dir}",
                                  "--candidates=6", "--sequence_length=9", "--top=3"])))
    lines = out.splitlines()
    assert "candidates ranked" in lines[0] and len(lines) == 6, out  # header, 3 rows, status
    assert lines[-1] == "False False", out
    assert seconds < 3.0, seconds
