"""`benchmarks/jax_forward.py` and `jax_train.py` (the GPU timings on Keras + JAX) run end to
end; CI runs them in its JAX pass on CPU, with tiny shapes."""

import importlib.util
import json
import os

import keras
import pytest

pytestmark = pytest.mark.jax


def load_benchmark(name):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="times Keras on the JAX backend")
def test_jax_forward_times_every_model_and_shape(tmp_path, capsys):
    output = tmp_path / "records.json"
    load_benchmark("jax_forward").main(["--models=ifa,din_full", "--shapes=12x30,5x7", "--repeats=2",
                        "--warmup=1", f"--output_json={output}"])
    records = json.loads(output.read_text())
    assert [(r["model"], r["m"], r["n"]) for r in records] == [
        ("ifa", 12, 30), ("ifa", 5, 7), ("din_full", 12, 30), ("din_full", 5, 7)]
    assert all(r["median_ms"] > 0 and r["first_call_ms"] > 0 and r["device"] for r in records)
    assert '"device"' in capsys.readouterr().out.splitlines()[0]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="profiles Keras on the JAX backend")
def test_jax_forward_profile_names_the_layers_that_took_the_time(tmp_path):
    output = tmp_path / "records.json"
    load_benchmark("jax_forward").main(["--models=ifa", "--shapes=6x9", "--repeats=1", "--warmup=0",
                        "--profile_models=ifa", "--profile_calls=2", "--profile_top=5",
                        f"--output_json={output}"])
    profile = json.loads(output.read_text())[0]["profile"]
    shares = [op["share"] for op in profile["ops"]]
    assert profile["device_ms_per_call"] > 0 and 0 < len(shares) <= 5
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    # Ops are named by the layer path XLA's metadata carries, e.g. the towers' products.
    assert any(op["op_name"].startswith("jit(forward)/") for op in profile["ops"])


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="trains Keras on the JAX backend")
def test_jax_train_times_default_compiled_training_steps(tmp_path):
    output = tmp_path / "train.json"
    load_benchmark("jax_train").main(["--models=ifa", "--batch_size=2", "--candidates=5",
                                      "--sequence_length=7", "--steps=2", "--warmup=1",
                                      f"--output_json={output}"])
    (record,) = json.loads(output.read_text())
    assert (record["model"], record["batch_size"], record["m"], record["n"]) == ("ifa", 2, 5, 7)
    assert record["requests_per_s"] == pytest.approx(2e3 / record["step_median_ms"])
