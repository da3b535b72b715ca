"""`benchmarks/jax_forward.py` (the GPU timing on Keras + JAX) runs end to end; CI runs it
in its JAX pass on CPU, with tiny shapes."""

import importlib.util
import json
import os

import keras
import pytest

pytestmark = pytest.mark.jax


def load_script():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "jax_forward.py")
    spec = importlib.util.spec_from_file_location("jax_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="times Keras on the JAX backend")
def test_jax_forward_times_every_model_and_shape(tmp_path, capsys):
    output = tmp_path / "records.json"
    load_script().main(["--models=ifa,din_full", "--shapes=12x30,5x7", "--repeats=2",
                        "--warmup=1", f"--output_json={output}"])
    records = json.loads(output.read_text())
    assert [(r["model"], r["m"], r["n"]) for r in records] == [
        ("ifa", 12, 30), ("ifa", 5, 7), ("din_full", 12, 30), ("din_full", 5, 7)]
    assert all(r["median_ms"] > 0 and r["first_call_ms"] > 0 and r["device"] for r in records)
    assert '"device"' in capsys.readouterr().out.splitlines()[0]
