"""`ifa-data`: the flags reach the library functions; misuse is a usage error."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from absl import app, flags

from ifa_tf.cli import data as cli
from ifa_tf.data import log_converter, records, simulator
from test_data_converter import fake_movielens_1m
from test_leak_audit import _busy_log


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


def test_candidate_set_flags_reach_the_converter_and_the_audit_is_printed(
        tmp_path, capsys, caplog):
    log = _busy_log(tmp_path / "log.csv")
    common = [f"--input={log}", "--columns=user,item,timestamp", "--max_candidates=30",
              "--num_negatives=10"]
    cli.main(["ifa-data", "from-log"], _flags(f"--output_dir={tmp_path / 'new'}", *common,
                                              "--negatives=exposure", "--exclude_history"))
    converter = records.read_metadata(str(tmp_path / "new"))["converter"]
    assert (converter["fixed_set_size"], converter["negatives"],
            converter["exclude_history"]) == (True, "exposure", True)
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("leak audit, test click AUC / GAUC of model-free scores: "
                              "set_size 0.500 / 0.500, popularity ")
    assert "set size alone" not in caplog.text
    cli.main(["ifa-data", "from-log"], _flags(f"--output_dir={tmp_path / 'old'}", *common,
                                              "--nofixed_set_size", "--negatives=popularity"))
    assert "leak audit: set size alone scores pooled AUC impression" in caplog.text


def test_preset_keeps_its_config_where_no_flag_is_given(tmp_path):
    fake_movielens_1m(tmp_path)
    metadata = cli.run_command("from-log", _flags(
        f"--output_dir={tmp_path / 'out'}", f"--input={tmp_path}", "--preset=movielens_1m",
        "--num_negatives=2", "--seed=3"))
    converter = metadata["converter"]
    assert (converter["num_negatives"], converter["seed"]) == (2, 3)  # given
    assert (converter["max_seq_len"], converter["max_candidates"],
            converter["window_seconds"]) == (2500, 50, 7 * 86_400)  # the preset's
    assert (converter["negatives"], converter["exclude_history"]) == ("popularity_matched",
                                                                      True)
    assert converter["item_table"] == str(tmp_path / "ml-1m.item")
    with pytest.raises(app.UsageError, match="Preset 'movielens_1m' sets \\['columns'\\]"):
        cli.main(["ifa-data", "from-log"], _flags(
            f"--output_dir={tmp_path / 'x'}", f"--input={tmp_path}", "--preset=movielens_1m",
            "--columns=user,item,timestamp"))


def test_item_table_flags_reach_the_converter(tmp_path):
    (tmp_path / "items.tsv").write_text("sku\tcats\nx\tshoes>running\ny\tbooks\n")
    log = tmp_path / "log.tsv"
    log.write_text("a\tx\t10\na\ty\t200000\n")
    metadata = cli.run_command("from-log", _flags(
        f"--output_dir={tmp_path / 'out'}", f"--input={log}", "--columns=user,item,timestamp",
        "--delimiter=tab", "--noheader", f"--item_table={tmp_path / 'items.tsv'}",
        "--item_table_key=sku", "--item_table_category=cats", "--item_table_separator=>",
        "--test_fraction=0", "--num_negatives=0"))
    assert metadata["schema"]["item_attributes"] == ["item_id", "category_id"]
    assert sorted(log_converter.read_vocabulary(str(tmp_path / "out"), "category").values()) == [
        "books", "shoes"]


def test_id_collisions_are_counted_and_reported(tmp_path, monkeypatch, capsys, caplog):
    """A hash space of 2 forces collisions; the expected count comes from the documented
    formula, computed here independently."""
    monkeypatch.setattr(log_converter, "_STRING_ID_SPACE", 2)
    users, items = ["ann", "bob", "cy"], ["p", "q", "r", "s"]

    def expected_collisions(values):
        ids = {1 + int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8,
                                                  key=b"ifa_tf.string_id.v1").digest(),
                                  "little") % 2 for v in values}
        return len(values) - len(ids)

    log = tmp_path / "log.csv"
    log.write_text("user,item,ts\n" + "".join(f"{u},{i},{10 * k}\n" for k, (u, i) in
                                              enumerate(zip(users * 4, items * 3))))
    cli.main(["ifa-data", "from-log"], _flags(
        f"--output_dir={tmp_path / 'out'}", f"--input={log}", "--columns=user,item,timestamp",
        "--test_fraction=0", "--num_negatives=0", "--window_seconds=5"))
    collisions = records.read_metadata(str(tmp_path / "out"))["id_collisions"]
    assert collisions == {"user": expected_collisions(users),
                          "item": expected_collisions(items)}
    assert collisions["item"] >= 2  # 4 items in 2 ids
    assert capsys.readouterr().out.endswith(
        f"; id collisions: user {collisions['user']}, item {collisions['item']} (distinct "
        "ids hashed to one int64; logged above, counted in metadata.json)\n")
    assert f"{collisions['item']} item id collisions: distinct item ids share one int64" in (
        caplog.text)


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



# Runs each `ifa-data` command of argv[1] (a JSON list of argument lists) in this process, as
# the console script would.
_RUN_COMMANDS = """
import json, sys
from absl import flags
from ifa_tf.cli import data as cli
for command, *argv in json.loads(sys.argv[1]):
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["ifa-data", *argv])
    cli.run_command(command, flag_values)
"""


def _sha256_of_files(directory):
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(directory))}


def test_two_runs_write_byte_identical_files(tmp_path):
    """Issue 16: users hash dataset files to cache and verify them. Each run is its own
    process, as a user's are (protobuf picks a map order per process); one process runs both
    commands, to pay for one TensorFlow import a run."""
    log = tmp_path / "log.csv"
    log.write_text("user,item,category,ts,type\n" + "".join(
        f"u{i % 5},item {i % 7},c{i % 3},{1_000 + 20_000 * i},pv\n" for i in range(40)))
    runs = []
    for run in ("a", "b"):
        commands = [
            ["synthetic", f"--output_dir={tmp_path / run / 'synthetic'}", "--num_shards=2",
             "--num_requests=30", "--max_seq_len=30", "--max_candidates=10",
             "--num_items=200", "--num_topics=8", "--num_authors=20", "--num_categories=5",
             "--truth_samples=4"],
            ["from-log", f"--output_dir={tmp_path / run / 'log'}", "--num_shards=2",
             f"--input={log}", "--columns=user,item,category,timestamp,action",
             "--actions=pv:click", "--num_negatives=3"]]
        result = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, json.dumps(commands)],
                                capture_output=True, text=True, timeout=180,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append({output: _sha256_of_files(tmp_path / run / output)
                     for output in ("synthetic", "log")})
    for output in ("synthetic", "log"):
        assert sum(name.endswith(".tfrecord.gz") for name in runs[0][output]) >= 3, output
        assert runs[0][output] == runs[1][output], output
