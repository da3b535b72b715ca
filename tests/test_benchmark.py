"""ifa-bench's own logic: configuration checks, FLOP counting, error capture, the report."""

import dataclasses
import json
import os

import pytest

from ifa_tf.benchmark import flops, report, runner


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"Unknown paths \['grpc'\]"):
        runner.BenchConfig(paths=("keras", "grpc"))
    with pytest.raises(ValueError, match="m_values"):
        runner.BenchConfig(m_values=(0,))
    with pytest.raises(ValueError, match="repeats=0"):
        runner.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="rounds=0"):
        runner.BenchConfig(rounds=0)
    with pytest.raises(ValueError, match="model_overrides='tower_dtype'"):
        runner.BenchConfig(model_overrides=("tower_dtype",))


def test_model_overrides_reach_zoo_build_and_the_command_line():
    config = runner.BenchConfig(model_overrides=("tower_dtype=mixed_bfloat16",
                                                 "tower_units=[32, 16]"))
    assert config.build_overrides() == {"tower_dtype": "mixed_bfloat16",
                                        "tower_units": [32, 16]}
    jobs = list(runner.jobs(config, ["ifa"], "/tmp/unused"))
    assert all(job["overrides"] == config.build_overrides() for job in jobs
               if job["kind"] in ("score", "export", "train"))
    assert report.command_line(dataclasses.asdict(config)).endswith(
        "--model_overrides=tower_dtype=mixed_bfloat16 --model_overrides=tower_units=[32, 16]")
    with pytest.raises(ValueError, match=r"Unknown model_overrides \['towers'\]"):
        runner.run_benchmark(runner.BenchConfig(models=("ifa",),
                                                model_overrides=("towers=2",)))


def test_model_overrides_for_one_model_reach_only_its_jobs():
    # IFA with an option and avg_pooling in the same run (issue 27's 1.5x check).
    config = runner.BenchConfig(model_overrides=("ifa:exact_matches=true",
                                                 "ifa:feature_map=relu", "dropout=0.1"))
    assert config.build_overrides("ifa") == {"exact_matches": True, "feature_map": "relu",
                                             "dropout": 0.1}
    assert config.build_overrides("avg_pooling") == {"dropout": 0.1}
    jobs = [job for job in runner.jobs(config, ["ifa", "avg_pooling"], "/tmp/unused")
            if job["kind"] in ("score", "export", "train")]
    assert {job["model"] for job in jobs} == {"ifa", "avg_pooling"}
    for job in jobs:
        assert job["overrides"] == config.build_overrides(job["model"])
    with pytest.raises(ValueError, match=r"not benchmarked: \['ifa'\]"):
        runner.run_benchmark(runner.BenchConfig(models=("avg_pooling",), model_overrides=(
            "ifa:exact_matches=true",)))
    with pytest.raises(ValueError, match=r"Unknown model_overrides \['exact_matches'\] "
                                         "for model 'avg_pooling'"):
        runner.run_benchmark(runner.BenchConfig(models=("avg_pooling",), model_overrides=(
            "exact_matches=true",)))
    with pytest.raises(ValueError, match="model_overrides=':k=3'"):
        runner.BenchConfig(model_overrides=(":k=3",))


def test_rounds_alternate_the_model_order_and_pool_the_timed_calls():
    config = runner.BenchConfig(models=("ifa", "twin"), paths=("keras", "saved_model"),
                                rounds=3)
    jobs = list(runner.jobs(config, ["ifa", "twin"], "/tmp/unused"))
    scores = [(job["round"], job["model"]) for job in jobs if job["kind"] == "score"]
    assert scores == [(0, "ifa")] * 2 + [(0, "twin")] * 2 + [(1, "twin")] * 2 + \
        [(1, "ifa")] * 2 + [(2, "ifa")] * 2 + [(2, "twin")] * 2
    assert [job["model"] for job in jobs if job["kind"] == "export"] == ["ifa", "twin"]

    def record(round_index, samples, peak):
        return {"kind": "score", "model": "ifa", "path": "keras", "m": 1, "n": 2,
                "round": round_index, "samples_ms": samples, "median_ms": 0.0,
                "peak_tensor_mb": peak, "peak_memory_mb": peak, "first_call_ms": peak,
                "load_average_1min": peak}

    train = {"kind": "train", "model": "ifa"}
    pooled = runner.pool_rounds([record(0, [1.0, 9.0], 2.0), train,
                                 record(1, [3.0, 5.0, 7.0], 1.0)])
    assert pooled[1] is train and len(pooled) == 2
    assert pooled[0]["median_ms"] == 5.0 and pooled[0]["repeats"] == 5
    assert pooled[0]["rounds"] == 2 and pooled[0]["peak_tensor_mb"] == 2.0
    assert pooled[0]["load_average_1min"] == 2.0 and "round" not in pooled[0]


def test_linear_attention_flops_counts_every_product():
    m, n, d, h, c = 7, 11, 6, 2, 3
    # Products written out one by one (multiply-add = 2): Q and K projections; phi(K)^T
    # value and its product with W_v per head; phi(Q_h) S_h and phi(Q_h) z_h; plus
    # elementwise terms (phi, key mask, phi(K)^T 1, scaling, the bias term of S).
    matmuls = 2 * (m * d * h * c + n * d * h * c + n * h * c * d + h * c * d * c
                   + m * h * c * c + m * h * c)
    elementwise = m * h * c + 2 * n * h * c + n * h * c + 2 * h * c * c + m * h * c
    assert flops.linear_attention_flops(m, n, d, d, d, h, c, c) == matmuls + elementwise
    with_output = flops.linear_attention_flops(m, n, d, d, d, h, c, c, output_dim=d)
    assert with_output == matmuls + elementwise + 2 * m * h * c * d


def test_run_job_turns_a_crash_into_an_error_record():
    records = runner.run_job({"kind": "score", "model": "no_such_model", "path": "keras",
                              "shapes": [[1, 1]], "repeats": 1, "warmup": 0}, timeout_s=120)
    assert records[-1]["kind"] == "error"
    assert "no_such_model" in records[-1]["error"]


def test_report_headline_and_tables(tmp_path):
    config = runner.BenchConfig(output_dir=str(tmp_path), models=("ifa", "avg_pooling"),
                                paths=("keras",), m_values=(10, 100), n_values=(10, 100))
    records = []
    for model, scale in (("ifa", 1.0), ("avg_pooling", 0.8)):
        for m in (10, 100):
            for n in (10, 100):
                records.append({"kind": "score", "model": model, "path": "keras", "m": m,
                                "n": n, "median_ms": scale * (1 + m / 10 + n / 100),
                                "p10_ms": 1.0, "p90_ms": 2.0, "min_ms": 1.0, "repeats": 3,
                                "peak_memory_mb": 10 * scale, "peak_tensor_mb": 20 * scale})
    results = {"config": vars(config), "records": records, "commit": "abc", "started": "t",
               "wall_time_s": 1.0, "machine": {"platform": "p", "cpu_count": 2,
                                               "matmul_gflops": 100.0,
                                               "memory_bandwidth_gbs": 10.0}}
    lines = report.headline(json.loads(json.dumps(results)))
    assert "IFA 12.0 ms" in lines[0]
    assert any("avg_pooling: 9.6 ms, IFA is 0.80x faster" in line for line in lines)
    assert any("peak tensor memory: IFA 20.0 MB, avg_pooling 16.0 MB, ratio 1.25" in line
               for line in lines)
    assert any("peak RSS growth: IFA 10.0 MB, avg_pooling 8.0 MB, ratio 1.25" in line
               for line in lines)
    report.write(results, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "| ifa | 2.1 (1.0-2.0) | 3.0 (1.0-2.0) | 11.1 (1.0-2.0) | 12.0 (1.0-2.0) |" in text
    assert (f"`ifa-bench --output_dir={tmp_path} --models=ifa,avg_pooling --paths=keras "
            "--m_values=10,100 --n_values=10,100`") in text
    assert os.path.exists(tmp_path / "time_vs_n_keras.png")


def test_zoo_ordering_groups_rows_the_seeds_cannot_tell_apart():
    # In a subprocess: the script defines its flags on absl's global FLAGS.
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import runpy\n"
        "ordering = runpy.run_path('benchmarks/zoo_results.py', run_name='zoo')['ordering']\n"
        # a: mean 0.91, spread 0.02; b is 0.004 under it, within a's spread.
        "values = {'d': [0.80], 'b': [0.905, 0.906, 0.907], 'a': [0.90, 0.91, 0.92],\n"
        "          'c': [0.850, 0.851, 0.852], 'e': [0.80]}\n"
        "print(ordering(values)); print(ordering(values, first_only=True))\n")
    output = subprocess.run([sys.executable, "-c", code], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    assert output == ["`a` ≈ `b` > `c` > `d` ≈ `e`", "`a` ≈ `b`"]
