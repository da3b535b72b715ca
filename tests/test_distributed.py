"""`train.strategy=multi_worker`: two worker processes on 127.0.0.1 train together with
`MultiWorkerMirroredStrategy` (the cluster from `TF_CONFIG`, the pipeline sharded by
`InputContext`) and end with identical weights; only the chief writes files."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from ifa_tf import training

    data_dir, model_dir, out = sys.argv[1:4]
    config = training.load_config("ifa", overrides=[
        ("data.train_data", data_dir + "/train-*"), ("data.schema", data_dir + "/schema.json"),
        ("data.batch_size", 8), ("train.steps", 4), ("train.epochs", 2),
        ("train.strategy", "multi_worker"), ("train.verbose", 0),
        ("model.embedding_dim", 4), ("model.tower_units", [8])])


    class SaveWeights(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            np.savez(out + ".initial.npz", *self.model.get_weights())

        def on_train_end(self, logs=None):
            np.savez(out, *self.model.get_weights())

    result = training.train_and_evaluate(config, model_dir, callbacks=[SaveWeights()])
    print(json.dumps({"train_steps": result["train_steps"]}))
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, write_tiny_dataset):
    return write_tiny_dataset(
        str(tmp_path_factory.mktemp("mw_data")),
        {"user_id": 101, "item_id": 311, "category_id": 29, "author_id": 67},
        num_requests=80, seed=5, max_seq_len=20, max_candidates=10, num_items=300,
        num_authors=60, truth_samples=4, test_fraction=0.0)


def test_two_workers_end_with_identical_weights(tiny_data, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    model_dir = tmp_path / "run"
    processes = []
    for index in range(2):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, str(script), tiny_data, str(model_dir),
             str(tmp_path / f"weights{index}.npz")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=180)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[:6000]
        assert '"train_steps": 4' in output

    first, second = (np.load(tmp_path / f"weights{i}.npz") for i in range(2))
    assert len(first.files) == len(second.files) > 10
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    # Each worker read its own shard, so equal weights mean the gradients were all-reduced;
    # and training did move them.
    initial = np.load(tmp_path / "weights0.npz.initial.npz")
    assert any(not np.array_equal(initial[name], first[name]) for name in first.files)
    # Only the chief (worker 0) wrote the run's files.
    written = sorted(os.listdir(model_dir))
    assert {"config.yaml", "metrics.json", "model.keras", "progress.jsonl"} <= set(written)
    progress = [json.loads(line) for line in (model_dir / "progress.jsonl").read_text()
                .splitlines()]
    assert len({entry["pid"] for entry in progress}) == 1
    assert processes[0].pid == progress[0]["pid"]
