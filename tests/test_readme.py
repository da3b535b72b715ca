"""Every Python snippet of README.md runs as written, in order, in one session, on a tiny
MovieLens-1M look-alike in the files and layout the README's commands produce (`ml-1m/`
as the fetch script writes it, `data/ml-1m/` as `ifa-data from-log --preset=movielens_1m`
converts it), with an `ifa-serve` on localhost:8500 for the serving snippet."""

import ast
import os
import re
import socket

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SNIPPET = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MOVIES = {
    "Toy Story (1995)": "Animation Children's Comedy", "Heat (1995)": "Action Crime Thriller",
    "Fargo (1996)": "Crime Drama Thriller", "Titanic (1997)": "Drama Romance",
    "Alien (1979)": "Action Horror Sci-Fi", "Babe (1995)": "Children's Comedy Drama",
    "Casino (1995)": "Drama Thriller", "Clueless (1995)": "Comedy Romance",
    "Jumanji (1995)": "Adventure Children's Fantasy", "Se7en (1995)": "Crime Thriller",
    "Twister (1996)": "Action Adventure Romance", "Scream (1996)": "Horror Thriller",
    "Ran (1985)": "Drama War", "Psycho (1960)": "Horror Thriller",
    "Vertigo (1958)": "Mystery Thriller", "Rocky (1976)": "Action Drama",
    "Amadeus (1984)": "Drama", "Goldfinger (1964)": "Action",
}
# As in the real log: user 1m_1 never rated these before 2001 (the README's and
# serving/README's candidates), and rated Toy Story, 5 stars, on 2001-01-06.
UNRATED_BY_1M_1 = ("Toy Story (1995)", "Heat (1995)", "Jumanji (1995)", "Babe (1995)",
                   "Casino (1995)")
TOY_STORY_BY_1M_1 = 978_739_200


def readme_snippets():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return _SNIPPET.findall(f.read())


def write_movielens_look_alike(directory):
    """`ml-1m.inter` and `ml-1m.item` in the fetch script's format (RecBole atomic files:
    tab-separated, typed header, CRLF line ends; movie titles as item ids)."""
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    titles = sorted(MOVIES)
    with open(os.path.join(directory, "ml-1m.item"), "w", newline="") as f:
        f.write("item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n")
        for title in titles:
            f.write(f"{title}\t{title[:-7]}\t{title[-5:-1]}\t{MOVIES[title]}\r\n")
    with open(os.path.join(directory, "ml-1m.inter"), "w", newline="") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n")
        for user in range(1, 9):
            time = 975_000_000 + int(rng.integers(0, 86_400))
            pool = [t for t in titles if user != 1 or t not in UNRATED_BY_1M_1]
            for title in rng.choice(pool, size=12, replace=False):
                f.write(f"1m_{user}\t{title}\t{int(rng.integers(1, 6))}\t{time}\r\n")
                time += int(rng.choice([60, 3_600, 4 * 86_400]))
        f.write(f"1m_1\tToy Story (1995)\t5\t{TOY_STORY_BY_1M_1}\r\n")


def free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    from ifa_tf import export
    from ifa_tf.data import log_converter
    from ifa_tf.serving.server import ModelServer, ServerOptions

    snippets = readme_snippets()
    assert len(snippets) >= 3
    for snippet in snippets:
        ast.parse(snippet)  # a syntax error names the snippet, not a line of this test
    monkeypatch.chdir(tmp_path)
    write_movielens_look_alike("ml-1m")
    # = ifa-data from-log --preset=movielens_1m --input=ml-1m --output_dir=data/ml-1m
    log_converter.convert_preset("movielens_1m", "ml-1m", "data/ml-1m")
    session = {"__name__": "__readme__"}
    server = None
    try:
        for index, snippet in enumerate(snippets):
            if "localhost:8500" in snippet and server is None:
                if not free(8500):
                    pytest.skip("port 8500 is taken: the serving snippet needs it (the "
                                f"{index} snippets before it ran)")
                export.export_saved_model(session["model"], "models/ifa",
                                          vocabularies="data/ml-1m", warmup_shapes=())
                server = ModelServer(ServerOptions(port=8500, model_name="ifa",
                                                   model_base_path=str(tmp_path / "models/ifa"),
                                                   file_system_poll_wait_seconds=0)).start()
            capsys.readouterr()
            exec(compile(snippet, f"README.md python snippet {index + 1}", "exec"), session)
            printed = capsys.readouterr().out
            if "print(f\"{score:.3f}  {title}\")" in snippet:
                ranked = [line.split("  ", 1)[1] for line in printed.splitlines()]
                assert sorted(ranked) == sorted(session["candidates"]), printed
                # The candidates are films the user had not rated by the request's time.
                before = log_converter.parse_timestamp("2001-01-01")
                assert "time=\"2001-01-01\"" in snippet
                rated = {row[1] for row in session["history"] if int(row[3]) < before}
                assert rated and not rated & set(session["candidates"]), rated
            if "raw_item_ids" in snippet:
                assert sorted(session["ranking"].raw_item_ids) == sorted(
                    session["candidates"]), printed
    finally:
        if server is not None:
            server.stop()


@pytest.mark.skipif(not os.path.exists("/tmp/ml-1m/ml-1m.inter"),
                    reason="MovieLens-1M not fetched (ifa-data fetch movielens_1m /tmp/ml-1m)")
def test_the_readme_candidates_are_unrated_in_the_real_log():
    """What the look-alike copies: in MovieLens-1M, 1m_1 rated none of the README's or
    serving/README's candidates before 2001, and Toy Story, 5 stars, on 2001-01-06."""
    import csv

    with open("/tmp/ml-1m/ml-1m.inter", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t") if row[0] == "1m_1"]
    rated = {row[1]: (row[2], int(row[3])) for row in rows}
    assert not set(UNRATED_BY_1M_1[1:]) & set(rated)
    stars, time = rated["Toy Story (1995)"]
    assert stars == "5" and 0 <= time - TOY_STORY_BY_1M_1 < 86_400  # that day, UTC
