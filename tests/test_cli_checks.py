"""Every command-line value that can be checked without TensorFlow is checked before it
loads: a mistake is one line, exit status 2, in under 2 s, with a "did you mean" where one
fits, and leaves no output directory (issue 35's list: a --set key, --columns against the
file's header, an item-table column, a timestamp column that is no time)."""

import json
import os
import subprocess
import sys
import time

import pytest
from absl import flags

from ifa_tf import cli
from ifa_tf.data import log_checks, log_converter, records
from ifa_tf.training import config as config_lib
from test_cli import verbosity  # noqa: F401 (a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = """
import sys, time
started = time.monotonic()
import ifa_tf_console
try:
    ifa_tf_console.run_command(sys.argv[1], sys.argv[1:])
except SystemExit as exit_info:
    code = exit_info.code
from ifa_tf import _deferred
print(code, _deferred.is_loaded("tensorflow"), "keras" in sys.modules,
      round(time.monotonic() - started, 3))
"""


def write_recbole_log(directory, users=6, ratings=8):
    """MovieLens-1M's RecBole files in miniature: user, title, rating 1-5, a real time."""
    os.makedirs(directory, exist_ok=True)
    titles = [f"Film {i} (199{i % 10})" for i in range(12)]
    with open(os.path.join(directory, "ml-1m.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n")
        f.writelines(f"{t}\t{t[:-7]}\t{t[-5:-1]}\tDrama Comedy\n" for t in titles)
    with open(os.path.join(directory, "ml-1m.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for user in range(users):
            for index in range(ratings):
                f.write(f"1m_{user}\t{titles[(user + index) % 12]}\t{1 + index % 5}\t"
                        f"{978_300_000 + 3 * 86_400 * index + user}\n")
    return os.path.join(directory, "ml-1m.inter")


def test_each_mistake_is_one_line_exit_2_in_under_2_s_before_tensorflow(tmp_path):
    log = write_recbole_log(tmp_path / "ml-1m")
    items = str(tmp_path / "ml-1m" / "ml-1m.item")
    from_log = ["ifa-data", "from-log", f"--input={log}", "--delimiter=tab"]
    cases = {
        "set key": (["ifa-train", "--model=ifa", f"--train_data={log}",
                     f"--model_dir={tmp_path / 'run'}", "--set=model.embeding_dim=8"],
                    "(did you mean 'model.embedding_dim'?)", tmp_path / "run"),
        "columns vs header": (from_log + [f"--output_dir={tmp_path / 'a'}",
                                          "--columns=user,item,category,timestamp,action",
                                          "--actions=>=4:click"],
                              "--columns: 5 roles (user,item,category,timestamp,action) but "
                              "ml-1m.inter's header has 4 columns: user_id, item_id, rating, "
                              "timestamp", tmp_path / "a"),
        "unknown role": (from_log + [f"--output_dir={tmp_path / 'b'}",
                                     "--columns=user,item,_,timestmp"],
                         "(did you mean 'timestamp'?)", tmp_path / "b"),
        "item table column": (from_log + [f"--output_dir={tmp_path / 'c'}",
                                          "--columns=user,item,_,timestamp",
                                          f"--item_table={items}",
                                          "--item_table_category=genres"],
                              "--item_table_category: " + items + " has no column 'genres' "
                              "(did you mean 'genre'?)", tmp_path / "c"),
        "rating as the time": (from_log + [f"--output_dir={tmp_path / 'd'}",
                                           "--columns=user,item,timestamp,_"],
                               "timestamp is column 3 ('rating'), whose values run 1 to 5",
                               tmp_path / "d"),
        "titles as the time": (from_log + [f"--output_dir={tmp_path / 'e'}",
                                           "--columns=user,timestamp,item,_"],
                               "timestamp is column 2 ('item_id'), whose values are no times",
                               tmp_path / "e"),
    }
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for name, (argv, expected, output_dir) in cases.items():  # one at a time, as timed
        process = subprocess.run([sys.executable, "-c", _SCRIPT, *argv], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        out, err = process.stdout, process.stderr
        code, tensorflow, keras_loaded, seconds = out.split()
        assert (code, tensorflow, keras_loaded) == ("2", "False", "False"), (name, err)
        assert err.count("\n") == 1 and err.startswith(f"{argv[0]}: "), (name, err)
        assert expected in err, (name, err)
        assert float(seconds) < 2.0, (name, seconds)
        assert not output_dir.exists(), name
        if name == "rating as the time":
            assert "(did you mean columns=user,item,_,timestamp?)" in err


def test_small_real_times_and_short_logs_pass_the_checks(tmp_path):
    log = tmp_path / "log.csv"
    # Times near 1970, but spanning more than a window: a relative clock, not a mistake.
    log.write_text("user,item,time\n" + "".join(f"u{i % 3},i{i},{1000 + 50_000 * i}\n"
                                                for i in range(30)))
    config = log_converter.LogConfig(columns="user,item,timestamp")
    log_checks.check_files(str(log), config)
    # Tiny times in one window: refused, unless requests need no earlier event.
    log.write_text("user,item,time\n" + "".join(f"u{i % 3},i{i},{i % 5}\n" for i in range(30)))
    with pytest.raises(log_checks.LogCheckError, match="timestamp is column 3 \\('time'\\)"):
        log_checks.check_files(str(log), config)
    log_checks.check_files(str(log), log_converter.LogConfig(columns="user,item,timestamp",
                                                              min_seq_len=0))
    # Fewer rows than tell anything: left to the conversion.
    log.write_text("user,item,time\na,x,1\na,y,2\n")
    log_checks.check_files(str(log), config)


def test_a_log_that_gives_no_request_says_why_and_leaves_no_directory(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,item,rating\n" + "".join(f"u{i % 2},i{i},{1 + i % 5}\n"
                                                  for i in range(6)))
    with pytest.raises(records.DataFormatError) as raised:
        log_converter.convert_log(str(log), str(tmp_path / "out"),
                                  log_converter.LogConfig(columns="user,item,timestamp"))
    assert str(raised.value) == (
        "No request has at least min_seq_len=1 earlier events: every user's events lie "
        "within one window of window_seconds=86400 (the longest user spans 4 s; the "
        "timestamps run 1 to 5). Is the timestamp column a time in seconds (or ISO 8601), "
        "and the window shorter than a user's history?")
    assert not (tmp_path / "out").exists()


def test_a_failed_run_discards_the_output_directory_it_created(tmp_path, verbosity):
    verbosity(-1)
    created = tmp_path / "data"

    def main(argv):
        os.makedirs(created)
        (created / "vocab_item.tsv").write_text("1\tx\n")  # partial output
        raise ValueError("bad data")

    flags.DEFINE_string("test_data_dir", None, "a test's", flag_values=flags.FLAGS)
    try:
        flags.FLAGS.test_data_dir = str(created)
        with pytest.raises(SystemExit):
            cli._run_main(main, "ifa-x", ["ifa-x"], discards=("test_data_dir",))
        assert not created.exists()
    finally:
        delattr(flags.FLAGS, "test_data_dir")


def test_the_model_options_file_is_the_zoos():
    """ifa-train checks --set model.* keys against zoo/model_options.json before Keras
    loads. After registering a model or adding an option, rewrite it with
    `python -c "from ifa_tf.training import config; config.write_model_options()"`."""
    path = os.path.join(config_lib.ZOO_CONFIG_DIR, config_lib.MODEL_OPTIONS_FILE)
    with open(path) as f:
        assert json.load(f) == config_lib.model_options()


def test_config_keys_suggest_the_closest():
    config = config_lib.load_config("ifa", check_model=False)
    config.model.overrides["num_head"] = 2
    with pytest.raises(ValueError, match="'model.num_head'\\] for model 'ifa' \\(did you mean "
                                         "'model.num_heads'\\?\\)"):
        config_lib.check_model_keys_early(config)
    with pytest.raises(ValueError, match="\\(did you mean 'data.batch_size'\\?\\)"):
        config_lib.load_config("ifa", overrides=["data.batchsize=3"], check_model=False)


def test_a_console_command_runs_whole_after_its_checks(six_step_data, tmp_path):
    """The checks ran with TensorFlow's __init__ held back (its protos imported alone);
    then the command loads it before Keras and trains as a plain import would (loaded from
    inside Keras' import, after Keras had imported parts of TensorFlow directly, it had
    left training in a graph scope that was gone). As a user's shell runs it: without the
    TF2_BEHAVIOR=1 that TensorFlow sets in this test process's environment."""
    env = {name: value for name, value in os.environ.items() if name != "TF2_BEHAVIOR"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, "-m", "ifa_tf_console", "ifa-train", "--model=avg_pooling",
         f"--train_data={six_step_data}/train-*", f"--schema={six_step_data}/schema.json",
         f"--model_dir={tmp_path / 'run'}", "--epochs=1", "--steps=2", "--verbose=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "trained avg_pooling: 2 steps" in process.stdout, process.stdout
