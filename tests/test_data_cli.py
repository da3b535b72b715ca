"""`ifa-data`: the flags reach the library functions; misuse is a usage error."""

import os
import subprocess
import sys

import pytest
from absl import app, flags

from ifa_tf.cli import data as cli
from ifa_tf.data import records, simulator


def _flags(*argv):
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["ifa-data", *argv])
    return flag_values


def test_synthetic_flags_reach_the_simulator(tmp_path):
    flag_values = _flags(f"--output_dir={tmp_path}", "--num_requests=6", "--seed=9",
                         "--max_seq_len=40", "--max_candidates=12", "--num_items=300",
                         "--num_topics=8", "--num_authors=30", "--num_categories=6",
                         "--num_shards=2", "--compression=none", "--truth_samples=4")
    metadata = cli.run_command("synthetic", flag_values)
    generator = records.read_metadata(str(tmp_path))["generator"]
    assert (generator["seed"], generator["num_requests"], generator["max_seq_len"],
            generator["max_candidates"], generator["num_items"]) == (9, 6, 40, 12, 300)
    assert metadata["splits"]["train"]["max_seq_len"] <= 40
    assert os.path.exists(tmp_path / "train-00001-of-00002.tfrecord")


def test_synthetic_preset_and_the_flags_given_over_it(tmp_path):
    flag_values = _flags(f"--output_dir={tmp_path}", "--preset=lifelong", "--num_requests=3",
                         "--max_seq_len=300", "--truth_samples=4", "--num_shards=1",
                         "--compression=none")
    assert cli.synthetic_config(flag_values) == simulator.lifelong_config(
        num_requests=3, max_seq_len=300, truth_samples=4)
    metadata = cli.run_command("synthetic", flag_values)
    generator = metadata["generator"]
    # The preset's values, not the flags' defaults (max_candidates=200, max_seq_len=1000).
    assert (generator["truth"], generator["max_candidates"], generator["max_seq_len"],
            generator["num_requests"]) == ("counts", 40, 300, 3)
    assert metadata["splits"]["train"]["ceiling_ladder"]["k"] == 100


def test_presets_belong_to_their_command(tmp_path):
    with pytest.raises(app.UsageError, match="--preset=lifelong does not apply to "
                                             "`ifa-data from-log`"):
        cli.run_command("from-log", _flags(f"--output_dir={tmp_path}", "--preset=lifelong",
                                           "--input=x"))
    with pytest.raises(app.UsageError, match="--preset=movielens_100k does not apply to "
                                             "`ifa-data synthetic`"):
        cli.run_command("synthetic", _flags(f"--output_dir={tmp_path}",
                                            "--preset=movielens_100k"))


def test_from_log_flags_reach_the_converter(tmp_path):
    log = tmp_path / "log.tsv"
    log.write_text("a\tx\t10\t4\na\ty\t20\t5\na\tz\t200000\t5\n")
    flag_values = _flags(f"--output_dir={tmp_path / 'out'}", f"--input={log}",
                         "--columns=user,item,timestamp,action", "--delimiter=tab",
                         "--noheader", "--actions=>=4:click,==5:like", "--test_fraction=0",
                         "--num_negatives=0")
    metadata = cli.run_command("from-log", flag_values)
    assert metadata["converter"]["header"] is False
    assert metadata["converter"]["delimiter"] == "\t"
    assert metadata["tasks"] == ["impression", "click", "like"]
    assert metadata["splits"]["train"]["num_requests"] == 1


def test_misplaced_and_missing_flags_are_usage_errors(tmp_path):
    with pytest.raises(app.UsageError, match="--num_requests"):
        cli.run_command("from-log", _flags(f"--output_dir={tmp_path}", "--num_requests=3",
                                           "--input=x"))
    with pytest.raises(app.UsageError, match="--actions"):
        cli.run_command("synthetic", _flags(f"--output_dir={tmp_path}", "--actions=a:click"))
    with pytest.raises(app.UsageError, match="--output_dir is required"):
        cli.run_command("synthetic", _flags())
    with pytest.raises(app.UsageError, match="Unknown command 'synthetc'"):
        cli.run_command("synthetc", _flags(f"--output_dir={tmp_path}"))
    with pytest.raises(app.UsageError, match="--columns"):
        cli.run_command("from-log", _flags(f"--output_dir={tmp_path}", "--input=x.csv"))


def test_console_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ifa_tf.cli.data", "synthetic", f"--output_dir={tmp_path}",
         "--num_requests=4", "--max_seq_len=20", "--max_candidates=10", "--num_items=200",
         "--num_topics=8", "--num_authors=20", "--num_categories=5"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote train=4 requests" in result.stdout
    assert os.path.exists(tmp_path / "metadata.json")
