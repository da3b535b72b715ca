"""`ifa-data from-log --runner`: the converter as an Apache Beam pipeline gives what the
in-process converter gives on the same log, flags and seed: the same records in the same
shard files (each file's records in another order), the same vocabularies and an equal
`metadata.json` (its leak audit included). Most runs use Beam's in-memory runner (the same
pipeline in this process, fast); one runs in the multi-process mode the command uses."""

import glob
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

beam = pytest.importorskip("apache_beam",
                           reason="Apache Beam is not installed (pip install 'ifa_tf[beam]')")

from ifa_tf.cli import beam_flags  # noqa: E402
from ifa_tf.cli import data as cli  # noqa: E402
from ifa_tf.data import beam_pipeline, log_converter, records  # noqa: E402

DAY = 86_400
COLUMNS = "user,item,category,timestamp,action"
ACTIONS = "pv:click,clk:click+long_view,fav:like"
REAL_MOVIELENS_100K = os.environ.get("IFA_TF_MOVIELENS_100K", "/tmp/ml-100k")


def _in_memory(*extra):
    return beam_pipeline.default_options(
        extra=["--direct_running_mode=in_memory", "--direct_num_workers=1", *extra])


def _log(path, seed=0, num_users=12, num_items=60, num_rows=700, bad_row=True):
    """String ids, categories, three actions, rows of one (user, item, time) to merge, and
    one malformed row."""
    rng = np.random.default_rng(seed)
    rows = ["user,item,category,timestamp,action"]
    for _ in range(num_rows):
        item = int(rng.integers(num_items))
        rows.append(f"u{rng.integers(num_users)},{'it' if item % 3 else ''}{item},"
                    f"c{item % 7},{int(rng.integers(30)) * DAY + int(rng.integers(DAY))},"
                    f"{rng.choice(['pv', 'pv', 'clk', 'fav'])}")
    rows.insert(40, rows[39])  # a repeated row: merged with its twin
    if bad_row:
        rows.insert(60, "u1,,c1,5,pv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(path)


def _records_by_file(directory):
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.tfrecord*"))):
        compression = records.compression_of(path)
        found[os.path.basename(path)] = sorted(
            r.numpy() for r in tf.data.TFRecordDataset(path, compression))
    return found


def _assert_same_output(in_process, on_beam):
    assert _records_by_file(on_beam) == _records_by_file(in_process)
    vocabularies = sorted(os.path.basename(p) for p in glob.glob(f"{in_process}/vocab_*"))
    assert sorted(os.path.basename(p) for p in glob.glob(f"{on_beam}/vocab_*")) == vocabularies
    for name in vocabularies:
        with open(os.path.join(in_process, name), "rb") as a, \
                open(os.path.join(on_beam, name), "rb") as b:
            assert a.read() == b.read(), name
    assert records.read_metadata(on_beam) == records.read_metadata(in_process)
    assert not glob.glob(os.path.join(on_beam, records.TMP_PREFIX + "*"))


def _both(log, tmp_path, options=None, num_shards=3, **config):
    config = log_converter.LogConfig(**config)
    in_process = str(tmp_path / "in_process")
    on_beam = str(tmp_path / "beam")
    expected = log_converter.convert_log(log, in_process, config, num_shards=num_shards)
    got = beam_pipeline.convert_log(log, on_beam, config, num_shards=num_shards,
                                    options=options or _in_memory())
    assert got == expected
    return in_process, on_beam, expected


# ----------------------------------------------------------------- the same output
@pytest.mark.parametrize("negatives, extra, groups", [
    ("popularity_matched", {"exclude_history": True}, 1),
    ("exposure", {}, 3),  # the grouping by user in 3 groups of users, as a large log's
    ("popularity", {"fixed_set_size": False}, 1),
])
def test_beam_writes_what_the_in_process_converter_writes(tmp_path, negatives, extra, groups):
    log = _log(tmp_path / "log.csv")
    in_process, on_beam, metadata = _both(
        log, tmp_path, options=_in_memory(f"--user_groups={groups}"), columns=COLUMNS,
        actions=ACTIONS, skip_bad_rows=True, negatives=negatives, max_candidates=12,
        num_negatives=4, **extra)
    _assert_same_output(in_process, on_beam)
    assert metadata["bad_rows"] == 1 and metadata["bad_row_lines"] == [61]
    assert metadata["leak_audit"]["num_requests"] > 10
    assert sorted(metadata["files"]) == [f"{split}-0000{i}-of-00003.tfrecord.gz"
                                         for split in ("test", "train") for i in range(3)]


def test_the_multi_process_runner_writes_the_same(tmp_path):
    """The runner the command uses: two worker processes, here with the grouping by user
    in two groups of users."""
    log = _log(tmp_path / "log.csv", seed=1, num_rows=300, bad_row=False)
    options = beam_pipeline.default_options(num_workers=2, extra=["--user_groups=2"])
    assert options.get_all_options()["direct_running_mode"] == "multi_processing"
    in_process, on_beam, _ = _both(log, tmp_path, options=options, columns=COLUMNS,
                                   actions=ACTIONS, max_candidates=10, num_negatives=3)
    _assert_same_output(in_process, on_beam)


def test_globs_of_plain_and_gzip_files_read_as_one_log(tmp_path):
    whole = _log(tmp_path / "whole.csv", seed=2, bad_row=False)
    with open(whole) as f:
        header, *rows = f.read().splitlines()
    (tmp_path / "parts").mkdir()
    with open(tmp_path / "parts" / "a.csv", "w") as f:
        f.write("\n".join([header, *rows[:300]]) + "\n")
    with gzip.open(tmp_path / "parts" / "b.csv.gz", "wt") as f:
        f.write("\n".join([header, *rows[300:]]) + "\n")
    pattern = str(tmp_path / "parts" / "*.csv*")
    kwargs = dict(columns=COLUMNS, actions=ACTIONS, max_candidates=12, num_negatives=4)
    in_process, on_beam, _ = _both(pattern, tmp_path, **kwargs)
    _assert_same_output(in_process, on_beam)
    # The same rows in one file give the same requests.
    log_converter.convert_log(whole, str(tmp_path / "single"),
                              log_converter.LogConfig(**kwargs), num_shards=3)
    assert _records_by_file(str(tmp_path / "single")) == _records_by_file(on_beam)


def test_the_local_runner_groups_a_large_log_in_groups_of_users(tmp_path):
    """One group of users per `GROUP_BYTES_PER_WORKER` of the log (a .gz file's bytes
    counted `_GZIP_RATIO` times) for each worker on the DirectRunner, whose workers get
    their share of a step's input at once; one on a cluster's runner, which streams it;
    `--user_groups` where given."""
    (tmp_path / "a.csv").write_bytes(b"x" * 2500)
    (tmp_path / "b.csv.gz").write_bytes(b"x" * 1000)
    files = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv.gz")]
    groups = beam_pipeline.user_groups
    assert groups(files, _in_memory(), bytes_per_worker=6500) == 1
    assert groups(files, _in_memory(), bytes_per_worker=1000) == 7  # 2,500 + 4 * 1,000
    two = beam_pipeline.default_options(num_workers=2)
    assert groups(files, two, bytes_per_worker=1000) == 4  # 6,500 / (2 * 1,000)
    assert groups(files, beam_pipeline.default_options("DataflowRunner"),
                  bytes_per_worker=1000) == 1
    assert groups(files, _in_memory("--user_groups=5"), bytes_per_worker=1000) == 5
    with pytest.raises(ValueError, match=r"--user_groups=0"):
        groups(files, _in_memory("--user_groups=0"))
    # Users spread over the groups, raw consecutive ids too.
    counts = np.bincount([beam_pipeline._key_group(user, 4) for user in range(1, 401)])
    assert counts.min() > 70


def test_the_local_workers_start_with_the_allocator_settings(monkeypatch):
    """The workers inherit them while the run starts them; a value already set is the
    user's; the driver's environment is as it was after the run."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "999")
    with beam_pipeline._worker_allocator():
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "131072"
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "999"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "999"


def test_an_item_table_gives_the_categories_on_beam_too(tmp_path):
    log = _log(tmp_path / "log.csv", seed=3, bad_row=False)
    with open(log) as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    with open(tmp_path / "nocategory.csv", "w") as f:
        f.write("\n".join(",".join(r[:2] + r[3:]) for r in rows) + "\n")
    items = sorted({r[1] for r in rows[1:]})
    with open(tmp_path / "items.csv", "w") as f:
        f.write("item_id,category\n" + "".join(f"{i},g{len(i)}\n" for i in items))
    in_process, on_beam, metadata = _both(
        str(tmp_path / "nocategory.csv"), tmp_path, columns="user,item,timestamp,action",
        actions=ACTIONS, item_table=str(tmp_path / "items.csv"), max_candidates=12,
        num_negatives=4)
    _assert_same_output(in_process, on_beam)
    assert "cand_cross_category_count" in metadata["schema"]["cross_features"]


def test_malformed_rows_fail_the_run_naming_the_file_and_line(tmp_path):
    """The rules are the parser's, one body for both drivers: an empty id, and a raw id
    longer than the 1,024 bytes serving takes."""
    log = _log(tmp_path / "log.csv")
    with open(log, "a") as f:
        f.write(f"{'u' * 1025},i1,c1,{DAY},pv\n")  # line 704
    config = log_converter.LogConfig(columns=COLUMNS, actions=ACTIONS)
    with pytest.raises(records.DataFormatError) as in_process:
        log_converter.convert_log(log, str(tmp_path / "a"), config)
    with pytest.raises(records.DataFormatError) as on_beam:
        beam_pipeline.convert_log(log, str(tmp_path / "b"), config, options=_in_memory())
    assert str(on_beam.value) == str(in_process.value)
    assert (f"{log}: 2 malformed rows: line 61: empty item; line 704: user id of 1025 bytes "
            "is longer than 1024 bytes") in str(on_beam.value)
    assert not os.path.exists(tmp_path / "b")  # nothing left behind, as in-process


def test_a_log_without_requests_is_the_same_error(tmp_path):
    """Every user's events within one window: both drivers say which timestamps put them
    there, from the same figures, and leave no output directory."""
    with open(tmp_path / "log.csv", "w") as f:
        f.write("user,item,timestamp\nu1,i1,5\nu1,i2,9\nu2,i1,6\n")
    config = log_converter.LogConfig(columns="user,item,timestamp", min_seq_len=1)
    errors = []
    for name, convert in (("a", log_converter.convert_log),
                          ("b", lambda *a: beam_pipeline.convert_log(*a, options=_in_memory()))):
        with pytest.raises(records.DataFormatError) as error:
            convert(str(tmp_path / "log.csv"), str(tmp_path / name), config)
        errors.append(str(error.value))
        assert not os.path.exists(tmp_path / name)
    assert errors[0] == errors[1]
    assert "the longest user spans 4 s; the timestamps run 5 to 9" in errors[1]


# ---------------------------------------------------------------------- MovieLens-100K
def _movielens_100k_stand_in(directory, num_users=30, num_items=120, num_ratings=1200):
    """RecBole's ml-100k files, MovieLens-100K's shape at a small size: ratings 1-5 over
    seven months, genres from an item table."""
    rng = np.random.default_rng(4)
    genres = ["Action", "Comedy", "Drama", "Thriller", "Romance"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ml-100k.item"), "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for item in range(1, num_items + 1):
            f.write(f"{item}\tMovie {item}\t1995\t{genres[item % 5]} {genres[item % 3]}\n")
    with open(os.path.join(directory, "ml-100k.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        seen = set()
        while len(seen) < num_ratings:
            user, item = int(rng.integers(1, num_users + 1)), int(rng.integers(1, num_items))
            if (user, item) not in seen:
                seen.add((user, item))
                f.write(f"{user}\t{item}\t{int(rng.integers(1, 6))}\t"
                        f"{874_724_710 + int(rng.integers(0, 215 * DAY))}\n")
    return str(directory)


def _compare_preset(data_dir, tmp_path, options=None):
    in_process, on_beam = str(tmp_path / "in_process"), str(tmp_path / "beam")
    expected = log_converter.convert_preset("movielens_100k", data_dir, in_process,
                                            num_shards=2)
    got = beam_pipeline.convert_preset("movielens_100k", data_dir, on_beam, num_shards=2,
                                       options=options or _in_memory())
    assert got == expected
    _assert_same_output(in_process, on_beam)
    return expected


def test_the_movielens_100k_preset_on_beam(tmp_path):
    metadata = _compare_preset(_movielens_100k_stand_in(tmp_path / "ml-100k"), tmp_path)
    assert metadata["preset"] == "movielens_100k" and metadata["num_events"] == 1200
    assert metadata["converter"]["exclude_history"] is True


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(REAL_MOVIELENS_100K, "ml-100k.inter")),
                    reason=f"MovieLens-100K not in {REAL_MOVIELENS_100K} (ifa-data fetch "
                           f"movielens_100k {REAL_MOVIELENS_100K}, or set "
                           "IFA_TF_MOVIELENS_100K)")
def test_the_real_movielens_100k_on_the_multi_process_runner(tmp_path):
    metadata = _compare_preset(REAL_MOVIELENS_100K, tmp_path,
                               beam_pipeline.default_options(num_workers=2))
    assert metadata["num_events"] == 100_000


# -------------------------------------------------------------------- command line
@pytest.fixture
def flag_values():
    values = flags.FlagValues()
    cli.define_flags(values)
    return values


def _parse(values, *arguments):
    values(["ifa-data", *arguments])
    return values


def test_the_command_runs_on_beam_with_runner(tmp_path, flag_values):
    log = _log(tmp_path / "log.csv", seed=5, bad_row=False)
    common = [f"--input={log}", f"--columns={COLUMNS}", f"--actions={ACTIONS}",
              "--max_candidates=12", "--num_negatives=4", "--num_shards=2"]
    _parse(flag_values, *common, f"--output_dir={tmp_path / 'beam'}", "--runner=DirectRunner",
           "--pipeline_options=--direct_running_mode=in_memory --direct_num_workers=1")
    cli.run_command("from-log", flag_values)
    in_process = flags.FlagValues()
    cli.define_flags(in_process)
    _parse(in_process, *common, f"--output_dir={tmp_path / 'in_process'}")
    cli.run_command("from-log", in_process)
    _assert_same_output(str(tmp_path / "in_process"), str(tmp_path / "beam"))


def test_the_early_checks_read_a_glob_of_plain_and_gzip_files(tmp_path, flag_values):
    """The checks before TensorFlow loads (the header, the timestamp column) read the first
    file of a glob, and the head of a `.gz` file: a glob is no 'file not found', and a
    column mistake is found in it."""
    _log(tmp_path / "whole.csv", seed=2, bad_row=False)
    with open(tmp_path / "whole.csv") as f:
        header, *rows = f.read().splitlines()
    (tmp_path / "parts").mkdir()
    with gzip.open(tmp_path / "parts" / "a.csv.gz", "wt") as f:
        f.write("\n".join([header, *rows[:300]]) + "\n")
    with open(tmp_path / "parts" / "b.csv", "w") as f:
        f.write("\n".join([header, *rows[300:]]) + "\n")
    common = [f"--input={tmp_path / 'parts' / '*.csv*'}", f"--output_dir={tmp_path / 'out'}",
              f"--actions={ACTIONS}"]
    assert cli.check(["ifa-data", "from-log"], _parse(flag_values, *common,
                                                      f"--columns={COLUMNS}")) is None
    flag_values.unparse_flags()
    _parse(flag_values, *common, "--columns=user,item,timestamp,category,action")
    with pytest.raises(app.UsageError, match="--columns: timestamp is column 3 .'category'., "
                                             "whose values are no times .*did you mean "
                                             "columns=user,item,category,timestamp,action"):
        cli.check(["ifa-data", "from-log"], flag_values)


@pytest.mark.parametrize("arguments, message", [
    (["--runner=DirectRuner"], "did you mean 'DirectRunner'"),
    (["--runner=DataflowRunner", "--pipeline_options=--projct=p"],
     "Beam has no option --projct"),
    (["--pipeline_options=--direct_num_workers=2"], "applies with --runner only"),
    (["--runner=DirectRunner", "--pipeline_options=--runner=FlinkRunner"],
     "pass the runner as --runner"),
    (["--runner=DirectRunner", "--pipeline_options=--project='p"], "No closing quotation"),
    (["--runner=DirectRunner", "--pipeline_options=--user_groups=0"],
     "--user_groups must be a positive integer. Received: --user_groups=0"),
])
def test_runner_mistakes_are_usage_errors(tmp_path, flag_values, arguments, message):
    log = _log(tmp_path / "log.csv")
    _parse(flag_values, f"--input={log}", f"--columns={COLUMNS}", f"--actions={ACTIONS}",
           f"--output_dir={tmp_path / 'out'}", *arguments)
    with pytest.raises(app.UsageError, match=message):
        cli.check_command("from-log", flag_values)


def test_runner_is_a_from_log_flag(tmp_path, flag_values):
    _parse(flag_values, f"--output_dir={tmp_path}", "--runner=DirectRunner")
    with pytest.raises(app.UsageError, match=r"\['--runner'\] do not apply"):
        cli.check_command("synthetic", flag_values)


@pytest.mark.parametrize("runner, given, expected", [
    ("DataflowRunner", "--project=my-project --region=europe-west1 "
                       "--temp_location=gs://bucket/tmp --num_workers=20",
     {"project": "my-project", "region": "europe-west1", "temp_location": "gs://bucket/tmp",
      "num_workers": 20}),
    ("FlinkRunner", "--flink_master=flink-host:8081 --parallelism=16 "
                    "--environment_type=LOOPBACK",
     {"flink_master": "flink-host:8081", "parallelism": 16, "environment_type": "LOOPBACK"}),
    ("SparkRunner", "--spark_master_url=spark://spark-host:7077",
     {"spark_master_url": "spark://spark-host:7077"}),
    ("DirectRunner", "--direct_num_workers=1 --user_groups=4",
     {"direct_num_workers": 1, "direct_running_mode": "multi_processing", "user_groups": 4}),
])
def test_pipeline_options_pass_through_to_the_cluster_runners(flag_values, runner, given,
                                                              expected):
    """What a cluster runner would be started with; nothing runs (no cluster here)."""
    _parse(flag_values, f"--runner={runner}", f"--pipeline_options={given}")
    beam_flags.check(flag_values)
    options = beam_flags.options(flag_values).get_all_options()
    assert options["runner"] == runner
    assert {name: options[name] for name in expected} == expected


def test_the_direct_runner_defaults_to_one_worker_per_core(flag_values):
    _parse(flag_values, "--runner=DirectRunner")
    options = beam_flags.options(flag_values).get_all_options()
    assert options["direct_running_mode"] == "multi_processing"
    assert options["direct_num_workers"] == os.cpu_count()


def test_our_pipeline_option_is_known_before_tensorflow_loads():
    """`--user_groups` is checked with Beam's options, before TensorFlow loads."""
    script = ("import sys\n"
              "from ifa_tf.cli import beam_flags\n"
              "print(sorted(beam_flags.unknown_options(['--user_groups=3', '--user_grups=3'])),"
              " beam_flags.user_groups(['--user_groups=3']), 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split("\n")[-2] == "['user_grups'] 3 False"


def test_runner_without_beam_installed_says_how_to_install(tmp_path):
    """Exit 2 and one line, before TensorFlow loads, where Apache Beam is not installed."""
    script = ("import importlib.util, sys\n"
              "real = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'apache_beam' "
              "else real(name, *a)\n"
              "import ifa_tf_console\n"
              "sys.argv = ['ifa-data', 'from-log', '--input=" + str(tmp_path) + "', "
              "'--columns=user,item,timestamp', '--output_dir=" + str(tmp_path / "o") + "', "
              "'--runner=DirectRunner']\n"
              "ifa_tf_console.data()\n")
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 2, process.stderr
    assert "needs Apache Beam: pip install 'ifa_tf[beam]'" in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
