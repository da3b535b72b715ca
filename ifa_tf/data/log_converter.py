"""Interaction log (CSV/TSV) -> candidate-set TFRecords.

Every log row is one event: a user was shown an item at a time, and possibly acted on it.
Each user's events are sorted by time and cut into request windows of `window_seconds`; a
request at time T (its window's first event) has
- sequence: the user's events strictly before T (never at or after it: no leakage), oldest
  first, the most recent `max_seq_len` kept;
- candidates: the distinct items of the window (impression 1, actions OR-ed over the window)
  and negatives (impression 0, no actions), shuffled. By default every request holds
  exactly `max_candidates` of them, whatever its window holds (`fixed_set_size`), and the
  negatives are drawn to look like positives (`negatives`); see "Candidate sets" below;
- cross features `cand_cross_<a>_count`: sequence events sharing the candidate's attribute.
Requests at or after the `1 - test_fraction` quantile of request times go to `test`.

Candidate sets: a set built from a log gives its labels away when its composition depends
on them, and a model then learns the construction instead of the user. Measured on
MovieLens-1M with the earlier composition (the window's items plus a fixed number of
popularity-sampled negatives): the set's size alone scored pooled click AUC 0.82, and
"the candidate is in the user's history" alone 0.65 (a movie is rated once, so a
negative from the history is always a negative). Each option removes one such signal:
- `fixed_set_size=True`: m = `max_candidates` in every request: the window's first
  `max_candidates - num_negatives` distinct items are positives (the rest of a busy window
  is counted in the metadata as `window_items_unlabelled`; those events stay in later
  sequences), negatives fill the set. Removes: the set size as a count of positives.
  Keeps: the request's positive rate varies, as it does in a feed.
  False: the earlier composition (window items plus `num_negatives`, capped at
  `max_candidates`), to reproduce earlier results.
- `negatives="popularity_matched"` (the default): each negative from the popularity
  stratum (how often the item is a positive of a training request, half powers of two) of
  a random positive of the request, drawn in proportion to that count. Removes: the
  popularity gap between positives and negatives. Keeps: the relation of each candidate to
  the user's own history, and what popularity says of an item's quality (a popular movie
  is rated higher, so click and like still favour popular items).
  `"exposure"`: the items of other users' request windows nearest in time (whole windows
  in random order, capped like positives): what others took in the same period, as recent
  and as coherent among themselves as a set of positives. Removes: recency and
  set-coherence differences. Keeps: popularity differences that `exclude_history`
  creates (a user's past holds the popular items, so the items left are less popular).
  `"popularity"`: by train-period popularity (the earlier sampler). Removes nothing.
  A draw that cannot be filled (a tiny log) is topped up by popularity, and counted
  (`negative_fallbacks`). Measured on MovieLens-1M (`benchmarks/results/leak_audit/`).
- `exclude_history=True`: negatives are never items of the user's past events. For logs
  where an item is consumed once (ratings: MovieLens), where a negative from the history is
  a give-away. Leave it False for logs with re-engagement (clicks, views): there a re-clicked
  item is a real positive and a seen item a real negative.
The test split's `leak_audit` in the metadata (`ifa_tf.data.leak_audit`) shows what each
choice leaves: model-free scores (set size, popularity, in the history, co-occurrence among
the candidates) and their pooled AUC and GAUC.

Malformed rows (wrong number of fields, empty ids, ids longer than `MAX_ID_BYTES`, bad
timestamps or action values, text that is not UTF-8, CSV that cannot be parsed) are an error naming the file and listing their
line numbers; with `skip_bad_rows` they are skipped, each logged with its line number and
counted in the metadata.

Ids: each raw id maps to an int64 >= 1 by its own value alone, so the same id gets the same
int64 on any machine, in any run, whatever else the log holds and in whatever order:
- a positive integer (1 to 18 digits, no leading zero) is kept as it is;
- any other value (a string, `0`, `007`, a longer number) becomes `string_id(value)`, a
  keyed 64-bit BLAKE2b hash of its UTF-8 bytes folded into 1..2^63-1.
Distinct values that end on one int64 are collisions: counted per role in the metadata
(`id_collisions`), logged and reported by `ifa-data`; with 64-bit hashes they are
vanishingly rare (about V^2 / 2^64 for V ids). For each role holding a hashed value,
`vocab_<role>.tsv` lists `<id><TAB><value>` for every distinct value, ordered by id, to
map ids back (`read_vocabulary`).

Categories come from a log column or from a side table of items (`LogConfig.item_table`).
A log is one file, a `.gz` file, or a glob of them read in order of their names (a row's
place in the log, which orders ties, is then its file, then its line).

One body of logic, two drivers: this module reads the log and drives the conversion in one
process; `beam_pipeline` drives the same conversion as an Apache Beam pipeline. Both call
the per-user work in `user_requests` (timelines, request windows, candidate sets,
sequences) and the global statistics in `log_statistics` and `leak_audit` (the split time,
popularity strata, id tables, split figures, the audit's sums), so their outputs agree.
`PRESETS` (`convert_preset`) read MovieLens-100K and -1M in either layout `ifa-data fetch`
writes: RecBole's atomic files or GroupLens's own (`ifa_tf.data.movielens`).
"""

import contextlib
import csv
import dataclasses
import datetime
import glob
import gzip
import hashlib
import io
import logging
import math
import operator
import os
import re

import numpy as np

from ifa_tf import schema as schema_lib
from ifa_tf._suggest import did_you_mean
from ifa_tf.data import leak_audit, log_statistics, movielens, records, user_requests

ROLES = ("user", "item", "category", "timestamp", "action", "_")
_REQUIRED_ROLES = ("user", "item", "timestamp")
# How the log and item table are read: plain CSV/TSV, or a GroupLens MovieLens layout.
LAYOUTS = ("csv", *movielens.GROUPLENS_LAYOUTS)
_KNOWN_ACTION_BITS = {"click": 1, "long_view": 2, "like": 4}
NEGATIVE_SAMPLERS = ("popularity_matched", "exposure", "popularity")
_COMPARISONS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt,
                "<": operator.lt}
_POSITIVE_INT = re.compile(r"^[1-9][0-9]{0,17}$")
_INTEGER = re.compile(r"^[+-]?[0-9]{1,4000}$")  # int() reads at most 4,300 digits
_INT64_MAX = 2**63 - 1
# Timestamps are int64 seconds from the epoch on: any two then differ by a valid int64 (a
# sequence event's time delta), and request seeds take no negative number.
TIMESTAMP_RANGE = (0, _INT64_MAX)
# The longest raw id (user, item, category), in UTF-8 bytes: `serving_raw` and `ifa-serve`
# refuse longer ones (an id's cost in the graph grows with its length), so the converter
# takes none either.
MAX_ID_BYTES = 1024
_MAX_LISTED_BAD_ROWS = 20
_LINE_BITS = 40  # `position`: lines of a file, below the file's index
_MAX_SHOWN_BYTES = 20
_UNDECODED = re.compile("[\udc80-\udcff]")  # how surrogateescape keeps bytes >= 0x80
# `string_id`'s key: a public constant, not a secret. It separates our ids from other uses of
# BLAKE2b; changing it changes every hashed id (a new dataset version).
_STRING_ID_KEY = b"ifa_tf.string_id.v1"
_STRING_ID_SPACE = 2**63 - 1  # every positive int64; tests shrink it to force collisions
_VOCAB_UNESCAPES = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """How to read a log and cut it into requests.

    Args:
        columns: the role of each column, in order: `user`, `item`, `category`, `timestamp`,
            `action`, or `_` (ignored). `user`, `item` and `timestamp` are required.
        delimiter: field separator (`"\\t"` for TSV).
        header: the first line is a header (skipped).
        actions: how action values become tasks: comma-separated `value:task[+task]`
            entries; a value may be a comparison on numbers (`>=4:click,==5:like`). Values
            matching no entry are impressions without action. Empty: every row is a click.
        window_seconds: length of a request window.
        min_seq_len: requests with fewer earlier events are not written.
        max_seq_len: most recent events kept in a sequence.
        num_negatives: with `fixed_set_size`, the fewest negatives a request holds (the
            window gives at most `max_candidates - num_negatives` positives); without, the
            negatives sampled per request.
        max_candidates: with `fixed_set_size`, every request's number of candidates;
            without, a cap on it (window items first).
        fixed_set_size: every request holds exactly `max_candidates` candidates (False: the
            earlier composition, whose size tells the number of positives).
        negatives: how negatives are drawn: `"popularity_matched"` (a positive's
            popularity stratum), `"exposure"` (other users' windows nearest in time) or
            `"popularity"` (train-period popularity, the earlier sampler).
        exclude_history: negatives are never items of the user's earlier events (logs where
            an item is consumed once).
        test_fraction: share of request times (the latest) in the `test` split.
        seed: fixes negative sampling and candidate order.
        skip_bad_rows: skip malformed rows (logged with line numbers, counted) instead of
            failing.
        item_table: path of a side table of item attributes, for logs whose events carry
            no category: one row per item, a header line naming the columns (RecBole's
            `name:type` is read as `name`), fields split by `delimiter`. Each event's
            category is its item's; an event whose item is not in the table is a
            malformed row, and so is a table row with a missing or repeated item or an
            empty category.
        item_table_key: the table's item id column.
        item_table_category: the table's category column.
        item_table_separator: splits a multi-valued category field (e.g. `" "` for
            MovieLens genres); the first value is the category. Empty: the whole field.
        layout: `"csv"`: the log and item table are CSV/TSV as the fields above describe.
            A GroupLens MovieLens layout (`"grouplens_ml-1m"`, `"grouplens_ml-100k"`,
            which the presets set): the log is GroupLens's ratings file and `item_table`
            its movie table, read by `ifa_tf.data.movielens` into rows of `columns` =
            user, item, action, timestamp; the CSV fields then only describe them.
    """

    columns: tuple = ("user", "item", "timestamp")
    delimiter: str = ","
    header: bool = True
    actions: str = ""
    window_seconds: int = 86_400
    min_seq_len: int = 1
    max_seq_len: int = 1000
    num_negatives: int = 50
    max_candidates: int = 200
    fixed_set_size: bool = True
    negatives: str = "popularity_matched"
    exclude_history: bool = False
    test_fraction: float = 0.2
    seed: int = 0
    skip_bad_rows: bool = False
    item_table: str = ""
    item_table_key: str = "item_id"
    item_table_category: str = "category"
    item_table_separator: str = ""
    layout: str = "csv"

    def __post_init__(self):
        columns = self.columns
        if isinstance(columns, str):
            columns = tuple(c.strip() for c in columns.split(","))
        object.__setattr__(self, "columns", tuple(columns))
        unknown = [c for c in self.columns if c not in ROLES]
        if unknown:
            raise ValueError(f"LogConfig.columns: unknown roles {unknown}"
                             f"{did_you_mean(unknown[0], ROLES)}; valid roles: "
                             f"{list(ROLES)}. Received: columns={self.columns!r}")
        for role in ROLES[:-1]:
            if self.columns.count(role) > 1:
                raise ValueError(f"LogConfig.columns names {role!r} twice. "
                                 f"Received: columns={self.columns!r}")
        missing = [r for r in _REQUIRED_ROLES if r not in self.columns]
        if missing:
            raise ValueError(f"LogConfig.columns must name {list(_REQUIRED_ROLES)}; missing "
                             f"{missing}. Received: columns={self.columns!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"LogConfig.layout must be one of {list(LAYOUTS)}. "
                             f"Received: layout={self.layout!r}")
        if self.layout == "csv" and len(self.delimiter) != 1:
            raise ValueError("LogConfig.delimiter must be one character. "
                             f"Received: delimiter={self.delimiter!r}")
        if self.layout != "csv" and (self.columns != movielens.ROW_COLUMNS
                                     or not self.item_table):
            raise ValueError(f"LogConfig: layout {self.layout!r} reads columns "
                             f"{list(movielens.ROW_COLUMNS)} and needs its item_table. "
                             f"Received: columns={self.columns!r}, "
                             f"item_table={self.item_table!r}")
        for name in ("window_seconds", "max_seq_len", "max_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LogConfig.{name} must be a positive integer. "
                                 f"Received: {name}={value!r}")
        for name in ("min_seq_len", "num_negatives", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LogConfig.{name} must be an integer >= 0. "
                                 f"Received: {name}={value!r}")
        if self.fixed_set_size and self.num_negatives >= self.max_candidates:
            raise ValueError("LogConfig: with fixed_set_size, num_negatives (the fewest "
                             "negatives) must leave room for a positive: below "
                             f"max_candidates. Received: num_negatives={self.num_negatives}, "
                             f"max_candidates={self.max_candidates}")
        if self.negatives not in NEGATIVE_SAMPLERS:
            raise ValueError(f"LogConfig.negatives must be one of {list(NEGATIVE_SAMPLERS)}. "
                             f"Received: negatives={self.negatives!r}")
        for name in ("fixed_set_size", "exclude_history"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LogConfig.{name} must be True or False. "
                                 f"Received: {name}={getattr(self, name)!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError("LogConfig.test_fraction must be in [0, 1). "
                             f"Received: test_fraction={self.test_fraction!r}")
        if "action" in self.columns and not self.actions:
            raise ValueError("LogConfig: the log has an action column, so actions= must map "
                             "its values to tasks (e.g. 'pv:click,fav:like' or "
                             "'>=4:click,>=5:like').")
        ActionRules.parse(self.actions)  # a bad spec fails here, not mid-conversion
        if self.item_table and "category" in self.columns:
            raise ValueError("LogConfig: the log has a category column and an item_table; "
                             "give categories by one of them. Received: "
                             f"columns={self.columns!r}, item_table={self.item_table!r}")
        for name in ("item_table_key", "item_table_category"):
            if not getattr(self, name):
                raise ValueError(f"LogConfig.{name} must name a column. Received: "
                                 f"{name}={getattr(self, name)!r}")

    @property
    def has_category(self):
        """Events carry a category (a log column or the item table)."""
        return "category" in self.columns or bool(self.item_table)

    @property
    def max_positives(self):
        """The most window items a request labels as positives."""
        return (self.max_candidates - self.num_negatives if self.fixed_set_size
                else self.max_candidates)

    @property
    def action_rules(self):
        return ActionRules.parse(self.actions)

    @property
    def tasks(self):
        return ("impression", *self.action_rules.tasks)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class ActionRules:
    """Maps an action value to a bit set of tasks (`click` 1, `long_view` 2, `like` 4,
    other task names the next bits in order of appearance)."""

    def __init__(self, literals, comparisons, tasks):
        self.literals = literals  # value -> bits
        self.comparisons = comparisons  # [(compare, threshold, bits)]
        self.tasks = tasks
        self.bits = {task: _task_bit(task, tasks) for task in tasks}

    @classmethod
    def parse(cls, spec):
        if not spec:
            return cls({}, [], ("click",))
        tasks, entries = [], []
        for entry in spec.split(","):
            value, sep, names = entry.strip().rpartition(":")
            entry_tasks = [t.strip() for t in names.split("+")]
            if not sep or not value or not all(re.fullmatch(r"[a-z][a-z0-9_]*", t)
                                               for t in entry_tasks):
                raise ValueError(f"actions: entry {entry!r} must be 'value:task[+task]' with "
                                 f"lower-case task names. Received: actions={spec!r}")
            if "impression" in entry_tasks:
                raise ValueError("actions: 'impression' is implied by every row; map values "
                                 f"to action tasks only. Received: actions={spec!r}")
            tasks.extend(t for t in entry_tasks if t not in tasks)
            entries.append((value, entry_tasks))
        ordered = tuple([t for t in _KNOWN_ACTION_BITS if t in tasks]
                        + [t for t in tasks if t not in _KNOWN_ACTION_BITS])
        literals, comparisons = {}, []
        for value, entry_tasks in entries:
            bits = 0
            for task in entry_tasks:
                bits |= _task_bit(task, ordered)
            comparison = next((op for op in _COMPARISONS if value.startswith(op)), None)
            if comparison is None:
                literals[value] = literals.get(value, 0) | bits
                continue
            try:
                threshold = float(value[len(comparison):])
            except ValueError:
                raise ValueError(f"actions: {value!r} compares with a non-number. "
                                 f"Received: actions={spec!r}") from None
            comparisons.append((_COMPARISONS[comparison], threshold, bits))
        return cls(literals, comparisons, ordered)

    def __call__(self, value):
        """Bits of one action value; raises ValueError when a comparison needs a number."""
        if not self.literals and not self.comparisons:
            return self.bits["click"]
        bits = self.literals.get(value, 0)
        if self.comparisons:
            try:
                number = float(value)
            except ValueError:
                if value not in self.literals:
                    raise ValueError(f"action value {value!r} is not a number") from None
                return bits
            if math.isnan(number):
                raise ValueError(f"action value {value!r} is not a number")
            for compare, threshold, entry_bits in self.comparisons:
                if compare(number, threshold):
                    bits |= entry_bits
        return bits


def _task_bit(task, tasks):
    if task in _KNOWN_ACTION_BITS:
        return _KNOWN_ACTION_BITS[task]
    others = [t for t in tasks if t not in _KNOWN_ACTION_BITS]
    return 8 << others.index(task)


@dataclasses.dataclass
class Events:
    """Parsed log rows (raw string ids) with their positions in the log: the line number in
    a log of one file; in a log of several files (a glob), `position(file index, line)`."""

    user: list
    item: list
    category: list
    timestamp: np.ndarray
    action_bits: np.ndarray
    line: np.ndarray
    # [(line, reason)] of skipped rows; in a log of several files `("<file>:<line>", reason)`
    bad_rows: list


# --------------------------------------------------------------------------------- reading
def log_files(pattern):
    """The files of a log: `pattern` itself when it names a file, else the files its glob
    matches, sorted by name (their order is the log's order). FileNotFoundError when there
    are none."""
    if os.path.isfile(pattern):
        return [pattern]
    files = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    if not files:
        raise FileNotFoundError(f"{pattern}: no such file, and no file matches it")
    return files


def position(file_index, line):
    """A row's place in a log of several files: file first, then line (int64)."""
    return (file_index << _LINE_BITS) | line


def read_log(path, config, parser=None):
    """Parses a log (CSV/TSV, or a GroupLens ratings file by `config.layout`; a file, a
    `.gz` file or a glob of them) into `Events`; malformed rows raise (or are skipped and
    logged), each file's before the next file is read. `parser`: the `RowParser` to read
    with (default: one of `config`)."""
    parser = parser or RowParser(config)
    files = log_files(path)
    user, item, category, timestamp, bits, positions, bad = [], [], [], [], [], [], []
    for index, file in enumerate(files):
        file_bad = []
        for line, row, fault in parser.rows(file):
            if fault is not None:
                file_bad.append((line, fault))
                continue
            user.append(row[0])
            item.append(row[1])
            category.append(row[2])
            timestamp.append(row[3])
            bits.append(row[4])
            positions.append(position(index, line))
        report_bad_rows(file, file_bad, config.skip_bad_rows)
        bad.extend(file_bad if len(files) == 1
                   else [(f"{file}:{line}", reason) for line, reason in file_bad])
    return Events(user, item, category, np.array(timestamp, np.int64),
                  np.array(bits, np.int64), np.array(positions, np.int64), bad)


class RowParser:
    """Reads the rows of a log's files as `config` describes them: its columns, action
    rules and item table (read once, here: its malformed rows raise or are reported now).
    The in-process converter reads every file with one; the Beam pipeline ships one to its
    workers, which read a file each.

    `check_time(seconds)`: a reader's own rule on event times beyond the converter's range,
    the reason a time is refused or None (the state store's `event_time_problem`); a row
    it refuses is a malformed row. A module-level function or a `functools.partial` of
    one, so that the parser travels to Beam's workers."""

    def __init__(self, config, check_time=None):
        self.config = config
        self.check_time = check_time
        self.rules = config.action_rules
        self.column = {role: config.columns.index(role) for role in ROLES[:-1]
                       if role in config.columns}
        self.item_of = None
        if config.layout == "csv":
            self.item_category = read_item_table(config) if config.item_table else None
        else:
            items = _grouplens_items(config)
            self.item_category, self.item_of = items.category_of, items.item_of

    def rows(self, path, open_binary=None):
        """Yields `(line, (user, item, category, timestamp, action bits), None)` for each
        event of the file at `path`, `(line, None, reason)` for each malformed row.
        `open_binary(path)`: a binary stream of the file's bytes, decompressed (default:
        the local file, `.gz` ungzipped)."""
        config = self.config
        if config.layout == "csv":
            reader = _csv_rows(path, config.delimiter, open_binary=open_binary)
        else:
            reader = movielens.rating_rows(config.layout, path, self.item_of)
        with contextlib.closing(reader) as rows:
            for line, row, error in rows:
                if line == 1 and config.header:
                    continue
                if not row and error is None:  # blank line
                    continue
                try:
                    yield line, self._event(row, error), None
                except ValueError as fault:
                    yield line, None, str(fault)

    def _event(self, row, error):
        config = self.config
        if error is not None:
            raise ValueError(error)
        if len(row) != len(config.columns):
            raise ValueError(f"{len(row)} fields, expected {len(config.columns)} "
                             f"(columns={','.join(config.columns)})")
        values = {role: row[i].strip() for role, i in self.column.items()}
        _check_text(values)
        for role in ("user", "item", "category"):
            if role in values and not values[role]:
                raise ValueError(f"empty {role}")
        if self.item_category is not None:
            if values["item"] not in self.item_category:
                raise ValueError(f"item {values['item']!r} is not in {config.item_table}")
            values["category"] = self.item_category[values["item"]]
        _check_id_lengths(values)
        time = parse_timestamp(values["timestamp"])
        problem = self.check_time and self.check_time(time)
        if problem:
            raise ValueError(problem)
        action = self.rules(values.get("action", ""))
        return values["user"], values["item"], values.get("category"), time, action


def read_item_table(config):
    """`{raw item id: raw category}` from `config.item_table` (in `config.layout`); malformed
    rows raise (or are skipped and logged with `skip_bad_rows`)."""
    if config.layout != "csv":
        return _grouplens_items(config).category_of
    path = config.item_table
    item_category, first_line, bad = {}, {}, []
    with contextlib.closing(_csv_rows(path, config.delimiter)) as rows:
        columns = _header(path, rows)
        position = {}
        for name in ("item_table_key", "item_table_category"):
            wanted = getattr(config, name)
            if wanted not in columns:
                raise records.DataFormatError(
                    f"{path}: no column {wanted!r} ({name}); its columns: {columns}")
            position[name] = columns.index(wanted)
        for line, row, error in rows:
            if not row and error is None:  # blank line
                continue
            try:
                if error is not None:
                    raise ValueError(error)
                if len(row) != len(columns):
                    raise ValueError(f"{len(row)} fields, expected {len(columns)}")
                item = row[position["item_table_key"]].strip()
                field = row[position["item_table_category"]].strip()
                _check_text({"item": item, "category": field})
                if not item:
                    raise ValueError("empty item")
                if item in first_line:
                    raise ValueError(f"item {item!r} is already on line {first_line[item]}")
                values = field.split(config.item_table_separator) if (
                    config.item_table_separator) else [field]
                if not values[0].strip():
                    raise ValueError("empty category")
            except ValueError as fault:
                bad.append((line, str(fault)))
                continue
            item_category[item] = values[0].strip()
            first_line[item] = line
    report_bad_rows(path, bad, config.skip_bad_rows)
    return item_category


def _grouplens_items(config):
    """The `movielens.Items` of a GroupLens layout's item table, its bad rows reported."""
    items = movielens.read_items(config.layout, config.item_table)
    report_bad_rows(config.item_table, items.bad_rows, config.skip_bad_rows)
    return items


def _csv_rows(path, delimiter, quoting=csv.QUOTE_MINIMAL, open_binary=None):
    """Yields `(line, row, error)` for each record of a CSV/TSV file: `line` its last line
    number, `row` its list of fields, or None and `error` saying why the record cannot be
    parsed (e.g. a field over the `csv` size limit; reading goes on at the next line).
    Bytes that are not UTF-8 are kept as surrogate escapes, so that one bad byte costs its
    row, not the file; `_check_text` rejects them in the fields used. `open_binary` as in
    `RowParser.rows`."""
    binary = (open_binary or _open_local)(path)
    # utf-8-sig drops a byte order mark, which would otherwise stick to the first field.
    with io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape",
                          newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield reader.line_num, None, f"unparseable CSV: {error}"
                continue
            yield reader.line_num, row, None


def _open_local(path):
    """A local file's bytes, ungzipped when its name ends in `.gz`."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _check_text(values):
    """Raises ValueError naming the first of `values` ({name: field}) that is not UTF-8."""
    for name, value in values.items():
        if not value.isascii() and _UNDECODED.search(value):
            raw = value.encode("utf-8", "surrogateescape")
            shown = repr(raw[:_MAX_SHOWN_BYTES]) + ("..." if len(raw) > _MAX_SHOWN_BYTES
                                                     else "")
            raise ValueError(f"{name} is not UTF-8 text: {shown}")


def _check_id_lengths(values):
    """Raises ValueError naming the first id of `values` longer than `MAX_ID_BYTES`."""
    for role in ("user", "item", "category"):
        size = len(values.get(role) or "")
        if size > MAX_ID_BYTES // 4:  # UTF-8 takes at most 4 bytes a character
            size = len(values[role].encode("utf-8", "surrogateescape"))
            if size > MAX_ID_BYTES:
                raise ValueError(f"{role} id of {size} bytes is longer than {MAX_ID_BYTES} "
                                 "bytes, the most a raw id may hold")


def report_bad_rows(path, bad_rows, skip):
    if not bad_rows:
        return
    listed = "; ".join(f"line {line}: {reason}" for line, reason in
                       bad_rows[:_MAX_LISTED_BAD_ROWS])
    more = len(bad_rows) - _MAX_LISTED_BAD_ROWS
    summary = f"{path}: {len(bad_rows)} malformed rows: {listed}" + (
        f"; and {more} more" if more > 0 else "")
    if not skip:
        raise records.DataFormatError(summary + " (skip them with skip_bad_rows / "
                                                "--skip_bad_rows)")
    for line, reason in bad_rows:
        _logger.warning("%s: skipped malformed line %d: %s", path, line, reason)
    _logger.warning("%s: skipped %d malformed rows in all", path, len(bad_rows))


def parse_timestamp(value):
    """Seconds since the epoch from a number or an ISO 8601 date (naive dates are UTC); a
    fraction of a second is dropped. Integers are read exactly, whatever their length. The
    result must lie in `TIMESTAMP_RANGE`, [0, 2^63 - 1]: int64 seconds from 1970 on."""
    if _INTEGER.match(value):
        seconds = int(value)
    else:
        try:
            number = float(value)
        except ValueError:
            try:
                parsed = datetime.datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"timestamp {value!r} is neither a number nor an ISO 8601 "
                                 "date") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=datetime.timezone.utc)
            number = parsed.timestamp()
        if math.isnan(number):
            raise ValueError(f"timestamp {value!r} is not a number")
        seconds = number  # compared as a float: an infinity or 1e19 is out of range too
    low, high = TIMESTAMP_RANGE
    if not low <= seconds <= high:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(f"timestamp {shown!r} is outside the range of int64 seconds since "
                         f"1970-01-01 this converter represents, [{low}, {high}]")
    return int(seconds)


# ------------------------------------------------------------------------------ converting
def convert_log(path, output_dir, config, num_shards=1, compression="gzip", source=None,
                progress=None):
    """Converts the log at `path` into `output_dir` (splits, vocabularies, metadata);
    `progress(written, total)`, if given, is called after each request written."""
    events = read_log(path, config)
    return convert_events(events, output_dir, config, num_shards, compression,
                          source=source or {"log": os.path.abspath(path)}, progress=progress)


def convert_events(events, output_dir, config, num_shards=1, compression="gzip",
                   source=None, progress=None):
    """Cuts parsed events into requests and writes them; returns the metadata.
    `progress(written, total)`, if given, is called after each request written."""
    if len(events.timestamp) == 0:
        raise records.DataFormatError("The log holds no valid rows.")
    schema = log_schema(config)
    ids, id_ranges, tables, collisions = {}, {}, {}, {}
    for role in id_roles(config):
        ids[role], table = encode_ids(getattr(events, role))
        id_ranges[f"{role}_id"] = [int(ids[role].min()), int(ids[role].max())]
        collisions[role] = log_statistics.report_collisions(role,
                                                            log_statistics.shared_ids(table))
        if needs_vocabulary(table):
            tables[role] = table
    item_category = {}
    if config.has_category:  # an item's category is the first one the log gives it
        item_category = {item: category for item, (_, category) in
                         log_statistics.first_categories(ids["item"], ids["category"],
                                                         events.line).items()}
    timeline = user_requests.merge_and_sort(ids["user"], ids["item"], events.timestamp,
                                            events.action_bits, events.line)
    requests = list(user_requests.request_points(timeline, config))
    if not requests:
        raise records.DataFormatError(_no_request_message(timeline, config))
    # Nothing is written before the requests are known: a log that gives none leaves no
    # output directory behind.
    os.makedirs(output_dir, exist_ok=True)
    vocab_files = {role: _write_vocabulary(output_dir, role, table)
                   for role, table in tables.items()}
    times = np.array([r.time for r in requests])
    split_time = log_statistics.split_time(times, config.test_fraction)
    log_statistics.warn_if_no_train(len(times), np.any(times < split_time),
                                    config.test_fraction, split_time)
    train_events = timeline.time < split_time
    popularity = log_statistics.ItemCounts().add(
        timeline.item[train_events] if np.any(train_events) else timeline.item).result()
    windows = [user_requests.window_positives(point, timeline, config.max_positives)
               for point in requests]
    labelled = [w[0] for w, r in zip(windows, requests) if r.time < split_time]
    positive_counts = (log_statistics.ItemCounts().add(np.concatenate(labelled)).result()
                       if labelled else None)
    exposure = ((times, [r.user for r in requests], [w[0] for w in windows])
                if config.negatives == "exposure" else None)
    sampler = log_statistics.make_sampler(config, popularity, np.unique(timeline.item),
                                          positive_counts, exposure)

    metadata = conversion_metadata(
        config, source, id_ranges, vocab_files, collisions, int(len(timeline.time)),
        len(events.bad_rows), [line for line, _ in events.bad_rows[:100]], split_time)
    audit = leak_audit.LeakAudit(schema.tasks, seed=config.seed)
    rules = config.action_rules
    written = 0
    for split in ("train", "test"):
        chosen = [i for i, r in enumerate(requests)
                  if (r.time >= split_time) == (split == "test")]
        if not chosen:
            continue
        statistics = log_statistics.SplitStatistics()
        with records.ShardedWriter(output_dir, split, min(num_shards, len(chosen)),
                                   compression) as writer:
            for index in chosen:
                request = user_requests.build_request(requests[index], windows[index],
                                                      timeline, item_category, sampler,
                                                      schema, rules, config)
                statistics.add(len(request["seq_item_id"]), len(request["cand_item_id"]),
                               request["impression"].sum(), windows[index][2])
                (audit.add_test if split == "test" else audit.add_train)(request)
                writer.write(records.encode_example(request, schema))
                written += 1
                if progress is not None:
                    progress(written, len(requests))
        metadata["files"].update(writer.row_counts)
        metadata["splits"][split] = statistics.result(
            os.path.basename(records.split_pattern(output_dir, split, compression)))
    metadata["negative_fallbacks"] = sampler.fallbacks
    metadata["leak_audit"] = audit.result()
    warning = leak_audit.set_size_warning(metadata["leak_audit"])
    if warning:
        _logger.warning("%s", warning)
    records.write_metadata(output_dir, metadata)
    return metadata


def conversion_metadata(config, source, id_ranges, vocab_files, collisions, num_events,
                        num_bad_rows, bad_row_lines, split_time):
    """`metadata.json` of a converted log before its splits are written (`splits`, `files`,
    `negative_fallbacks` and `leak_audit` are added as they are)."""
    schema = log_schema(config)
    return {
        "source": "log", **(source or {}),
        "schema": schema.to_dict(), "tasks": list(schema.tasks), "id_ranges": id_ranges,
        "vocabularies": vocab_files, "id_collisions": collisions,
        "converter": config.to_dict(),
        "action_bits": config.action_rules.bits, "num_events": num_events,
        "bad_rows": num_bad_rows, "bad_row_lines": bad_row_lines,
        "split_time": split_time, "splits": {}, "files": {},
    }


def log_schema(config):
    """The `FeatureSchema` of the requests a log gives under `config`."""
    has_category = config.has_category
    return schema_lib.FeatureSchema(
        item_attributes=("item_id", "category_id") if has_category else ("item_id",),
        cross_features=("cand_cross_category_count",) if has_category else (),
        tasks=config.tasks, score_task=config.tasks[1])


def id_roles(config):
    """The roles whose raw ids map to int64 ids."""
    return ("user", "item", "category") if config.has_category else ("user", "item")


def _no_request_message(timeline, config):
    """`no_request_message` of a whole log's `Timeline`."""
    starts, ends = timeline.user_start[:-1], timeline.user_start[1:] - 1
    spans = timeline.time[ends] - timeline.time[starts]
    return no_request_message(config, int(spans.max()), int(timeline.time.min()),
                              int(timeline.time.max()))


def no_request_message(config, longest_span, first_time, last_time):
    """Why no request was cut: too few earlier events, and, when every user's events lie
    within one window (the longest user's events span `longest_span` seconds), the
    timestamps that put them there (the log's run from `first_time` to `last_time`)."""
    message = f"No request has at least min_seq_len={config.min_seq_len} earlier events"
    if longest_span >= config.window_seconds:
        return message + "."
    return message + (f": every user's events lie within one window of window_seconds="
                      f"{config.window_seconds} (the longest user spans {longest_span} "
                      f"s; the timestamps run {first_time} to {last_time}). Is the timestamp "
                      "column a time in seconds (or ISO 8601), and the window shorter than a "
                      "user's history?")


def string_id(value):
    """The int64 id of a raw id that is not kept as an integer: 1 + (BLAKE2b-64 of the UTF-8
    bytes, keyed with `b"ifa_tf.string_id.v1"`, read little-endian) mod (2^63 - 1). Never 0
    (padding), never negative; the same on every machine and in every run."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8,
                             key=_STRING_ID_KEY).digest()
    return 1 + int.from_bytes(digest, "little") % _STRING_ID_SPACE


def encode_id(value):
    """One raw id's int64 id: a positive integer is kept, any other value is
    `string_id(value)`."""
    return int(value) if _POSITIVE_INT.match(value) else string_id(value)


def encode_ids(values):
    """Raw ids -> int64 ids >= 1, each by its own value (`encode_id`). Returns `(ids,
    table)`, `table` mapping each distinct value to its id."""
    table = {value: encode_id(value) for value in set(values)}
    return np.fromiter((table[value] for value in values), np.int64, len(values)), table


def needs_vocabulary(values):
    """A role needs `vocab_<role>.tsv` when one of its distinct raw `values` is hashed."""
    return any(not _POSITIVE_INT.match(value) for value in values)


def _write_vocabulary(output_dir, role, table):
    """`vocab_<role>.tsv` of `table` ({value: id}; `log_statistics.vocabulary_lines`)."""
    name = f"vocab_{role}.tsv"
    tmp_path = os.path.join(output_dir, ".tmp-" + name)
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(log_statistics.vocabulary_lines((id_, value)
                                                     for value, id_ in table.items()))
    os.replace(tmp_path, os.path.join(output_dir, name))
    return name


def read_vocabulary(output_dir, role):
    """`{id: raw value}` of a converted log's `vocab_<role>.tsv` (roles whose ids were all
    kept integers have none: their ids are their values). Where ids collided, the first
    value in the file's order is kept."""
    vocabulary = {}
    with open(os.path.join(output_dir, f"vocab_{role}.tsv"), encoding="utf-8",
              newline="\n") as f:
        for line in f:
            id_, value = line.rstrip("\n").split("\t", 1)
            vocabulary.setdefault(int(id_), re.sub(r"\\[\\tnr]",
                                                   lambda m: _VOCAB_UNESCAPES[m.group()],
                                                   value))
    return vocabulary


# `user_requests.merge_and_sort` under the name the state store and the request builder
# call it by (it lived here before the per-user work moved to `user_requests`).
_merge_and_sort = user_requests.merge_and_sort


# -------------------------------------------------------------------------------- presets
MOVIELENS_ACTIONS = ">=4:click,==5:like"
_RECBOLE_COLUMNS = ("user_id", "item_id", "rating", "timestamp")  # checked in the file


@dataclasses.dataclass(frozen=True)
class Preset:
    """A known log: its files in one directory, in either layout of `movielens.LAYOUTS`
    (RecBole's atomic files: tab-separated, a typed header line, ids as tokens; or
    GroupLens's own, which `ifa_tf.data.movielens` reads to the same rows), and the
    `LogConfig` fields that suit it.

    Args:
        log_file: RecBole's interactions (`user_id`, `item_id`, `rating`, `timestamp`).
        item_file: RecBole's item table; an event's category is the first of its item's
            genres.
        category_column: RecBole's item table's genre column.
        defaults: `LogConfig` fields the preset sets (the caller may override them).
    """

    log_file: str
    item_file: str
    category_column: str
    defaults: dict = dataclasses.field(default_factory=dict)


PRESETS = {
    # 943 users, 1,682 movies, 100,000 ratings: the `LogConfig` defaults (day windows, the
    # last 1,000 events, 200 candidates, at least 50 of them negatives matched to the
    # positives' popularity); a movie is rated once, so never a negative from the user's
    # own history (see "Candidate sets" in the module docstring).
    "movielens_100k": Preset("ml-100k.inter", "ml-100k.item", "class",
                             {"exclude_history": True}),
    # 6,040 users, 3,706 movies, 1,000,209 ratings in 2000-2003; a user has 96 ratings at the
    # median, 400 at the 90th percentile, 399 users have 500 or more, the longest 2,314.
    # A benchmark for lifelong sequences, sized for the zoo on a 2-core CPU:
    "movielens_1m": Preset("ml-1m.inter", "ml-1m.item", "genre", {
        # above the longest history (2,306 earlier ratings): no sequence is ever cut.
        "max_seq_len": 2500,
        # A week's ratings make one request: a third fewer requests than day windows
        # (10,185 against 15,199) with the same sequences, so the O(mn) models fit.
        "window_seconds": 7 * 86_400,
        # A week holds 3 ratings at the median, 42 at the 90th percentile. Every request
        # holds 50 candidates (the cost of the O(mn) models grows with m; 50 halves it
        # against 100), at least 30 of them negatives: the week's first 20 movies are its
        # positives (the whole week of most requests; `window_items_unlabelled` in the
        # metadata counts the rest, which stay in later sequences).
        "max_candidates": 50,
        "num_negatives": 30,
        # Negatives matched to the positives' popularity, never a movie the user rated
        # before (a movie is rated once: a rated one is a give-away negative). Of the
        # samplers, the one whose model-free scores stay nearest 0.5 GAUC here
        # (benchmarks/results/leak_audit/).
        "negatives": "popularity_matched",
        "exclude_history": True,
    }),
}


def preset_config(name, data_dir, **overrides):
    """The `LogConfig` of preset `name` over the files in `data_dir`: the layout of the
    files found there (columns, delimiter, header, item table; FileNotFoundError naming the
    files looked for when neither layout is complete), the preset's defaults, then
    `overrides`. Ratings map to tasks by `MOVIELENS_ACTIONS` (>= 4: click, 5: like) unless
    `actions` is overridden."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    preset = PRESETS[name]
    layout = _preset_layout(preset, movielens.find_layout(name, data_dir), data_dir)
    fixed = sorted(set(overrides) & set(layout))
    if fixed:
        raise ValueError(f"Preset {name!r} sets {fixed} itself (the layout of its files); "
                         f"do not pass them. Received: {fixed}")
    return LogConfig(**{"actions": MOVIELENS_ACTIONS, **preset.defaults, **overrides,
                        **layout})


def _preset_layout(preset, layout, data_dir):
    """The `LogConfig` fields that describe the preset's files in `layout`."""
    if layout.name == "csv":
        return {"columns": movielens.ROW_COLUMNS, "delimiter": "\t", "header": True,
                "item_table": os.path.join(data_dir, preset.item_file),
                "item_table_key": "item_id", "item_table_category": preset.category_column,
                "item_table_separator": " ", "layout": "csv"}
    # GroupLens's files, named as GroupLens's README names their fields (only `layout`,
    # `columns` and `item_table` are read; the rest describe the files).
    one_m = layout.name == "grouplens_ml-1m"
    return {"columns": movielens.ROW_COLUMNS, "delimiter": "::" if one_m else "\t",
            "header": False, "item_table": os.path.join(data_dir, layout.item_file),
            "item_table_key": "MovieID" if one_m else "movie id",
            "item_table_category": "Genres" if one_m else "genre",
            "item_table_separator": "|" if one_m else "", "layout": layout.name}


def preset_log_file(name, data_dir, config):
    """The log file of preset `name` in `data_dir` in the layout `config` reads (a dataset's
    recorded `LogConfig`): one line naming it when it is not there."""
    layout = next(layout for layout in movielens.LAYOUTS[name] if layout.name == config.layout)
    path = os.path.join(data_dir, layout.log_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not there; the dataset was converted from "
                                f"{layout.source}'s files ({', '.join(layout.files)})")
    return path


def convert_preset(name, data_dir, output_dir, num_shards=1, compression="gzip",
                   progress=None, **overrides):
    """Converts the files of preset `name` in `data_dir` (`preset_config(name, data_dir,
    **overrides)`; either layout) into `output_dir`; returns the metadata. `progress` as in
    `convert_log`."""
    log, config, source = preset_conversion(name, data_dir, **overrides)
    return convert_log(log, output_dir, config, num_shards, compression, source=source,
                       progress=progress)


def preset_conversion(name, data_dir, **overrides):
    """`(log file, LogConfig, source)` of preset `name`'s files in `data_dir` (the log's
    columns checked), what `convert_preset` hands to a converter."""
    config = preset_config(name, data_dir, **overrides)
    layout = movielens.find_layout(name, data_dir)
    log = os.path.join(data_dir, layout.log_file)
    if layout.name == "csv":
        with contextlib.closing(_csv_rows(log, "\t")) as rows:
            columns = _header(log, rows)
        if tuple(columns) != _RECBOLE_COLUMNS:
            raise records.DataFormatError(f"{log}: columns {columns}, expected "
                                          f"{list(_RECBOLE_COLUMNS)} (preset {name!r})")
    return log, config, {"preset": name, "layout": layout.source,
                         "log": os.path.abspath(data_dir)}


def convert_movielens_100k(data_dir, output_dir, config=None, num_shards=1,
                           compression="gzip"):
    """`convert_preset("movielens_100k", ...)` with the request cutting and `actions` of
    `config` (its other fields are the preset's)."""
    layout = _preset_layout(PRESETS["movielens_100k"],
                            movielens.find_layout("movielens_100k", data_dir), data_dir)
    overrides = {} if config is None else {
        field: value for field, value in config.to_dict().items()
        if field not in layout and (field != "actions" or value)}
    return convert_preset("movielens_100k", data_dir, output_dir, num_shards, compression,
                          **overrides)


def _header(path, rows):
    """The column names (without RecBole's `:type`) of the first record of `_csv_rows`."""
    line, header, error = next(rows, (1, None, "the file is empty"))
    if error is not None:
        raise records.DataFormatError(f"{path}: line {line}: {error}")
    return [name.split(":")[0] for name in header]
