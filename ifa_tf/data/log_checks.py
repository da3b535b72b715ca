"""What a log conversion can be told wrong from the first and last lines of its files, in
well under a second: the check `ifa-data from-log` runs before TensorFlow loads and before
it reads the whole log (`check_files`).

- The log's column count (its header, or its first line) against `columns`.
- The item table's header against `item_table_key` and `item_table_category`.
- The timestamp column: values that are no time at all (`Toy Story (1995)`), or tiny
  numbers near 1970-01-01 (a rating given the timestamp role: 1 to 5) that put every
  user's events in one request window, where no request can have an earlier event.

Each mistake is a `LogCheckError` naming the `LogConfig` field (the command's flag of the
same name) and, where a column's name suggests it, the fix ("did you mean").
"""

import contextlib
import csv
import io
import os

from ifa_tf._suggest import did_you_mean
from ifa_tf.data import log_converter

SAMPLE_ROWS = 10_000
_TAIL_BYTES = 1 << 18
# Fewer rows than this tell nothing about a column.
_MIN_SAMPLE = 20
# A timestamp below this (1970-01-12) is no calendar time: a count, a rating, a day number.
_NEAR_EPOCH = 10**6
_TIME_NAMES = ("timestamp", "time", "ts", "datetime", "date", "event_time", "created_at")


class LogCheckError(ValueError):
    """A mistake in `field` of a `LogConfig` (its message says what, one line)."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_files(path, config, sample_rows=SAMPLE_ROWS):
    """Raises `LogCheckError` for the mistakes above in the log at `path` read by `config`
    (a CSV/TSV layout; GroupLens layouts are read by their own rules and skipped). `path`
    may be a glob (the first file's head and the last file's tail are read) or `.gz`
    files (their head only); a cluster's file system (`gs://...`) is left to the run."""
    if config.layout != "csv" or "://" in path:
        return
    files = log_converter.log_files(path)
    path = files[0]
    head, header = _head(path, config, sample_rows)
    names = header or [f"column {i + 1}" for i in range(len(config.columns))]
    width = len(header) if header else (len(head[0]) if head else None)
    if width is not None and width != len(config.columns):
        where = (f"{os.path.basename(path)}'s header has {width} columns: {', '.join(header)}"
                 if header else f"the first line of {os.path.basename(path)} has {width} "
                 "fields")
        raise LogCheckError("columns", f"{len(config.columns)} roles "
                            f"({','.join(config.columns)}) but {where}")
    if config.item_table:
        _check_item_table(config)
    rows = head + _tail(files[-1], config, sample_rows)
    _check_timestamps(config, names, rows)


def _head(path, config, limit):
    """`(the first `limit` rows, the header's names or None)`; unparseable rows left out."""
    rows, header = [], None
    with contextlib.closing(log_converter._csv_rows(path, config.delimiter)) as records:
        for line, row, error in records:
            if line == 1 and config.header:
                header = [name.split(":")[0].strip() for name in row or []]
                continue
            if error is None and row:
                rows.append(row)
            if len(rows) >= limit:
                break
    return rows, header


def _tail(path, config, limit):
    """Up to `limit` rows of the log's last bytes (none when the head read it whole, or
    from a `.gz` file, whose end is not found without reading all of it)."""
    size = os.path.getsize(path)
    if size <= _TAIL_BYTES or path.endswith(".gz"):
        return []
    with open(path, "rb") as f:
        f.seek(size - _TAIL_BYTES)
        text = f.read().decode("utf-8", "surrogateescape")
    lines = text.splitlines()[1:]  # the first is cut
    try:
        rows = list(csv.reader(io.StringIO("\n".join(lines[-limit:])),
                               delimiter=config.delimiter))
    except csv.Error:
        return []
    return [row for row in rows if row]


def _check_item_table(config):
    with contextlib.closing(log_converter._csv_rows(config.item_table,
                                                    config.delimiter)) as records:
        line, header, error = next(records, (1, None, "the file is empty"))
    if error is not None:
        raise LogCheckError("item_table", f"{config.item_table}: line {line}: {error}")
    columns = [name.split(":")[0].strip() for name in header]
    for field in ("item_table_key", "item_table_category"):
        wanted = getattr(config, field)
        if wanted not in columns:
            raise LogCheckError(field, f"{config.item_table} has no column {wanted!r}"
                                f"{did_you_mean(wanted, columns)}; its columns: "
                                f"{', '.join(columns)}")


def _check_timestamps(config, names, rows):
    position = config.columns.index("timestamp")
    values = [row[position].strip() for row in rows if len(row) == len(config.columns)]
    if len(values) < _MIN_SAMPLE:
        return
    times, faults = [], []
    for value in values:
        try:
            times.append(log_converter.parse_timestamp(value))
        except ValueError:
            faults.append(value)
    column = f"column {position + 1} ({names[position]!r})" if not names[position].startswith(
        "column ") else names[position]
    hint = _time_column_hint(config, names, position)
    if len(faults) * 10 >= len(values) * 9:
        raise LogCheckError("columns", f"timestamp is {column}, whose values are no times "
                            f"(e.g. {faults[0][:40]!r}; a time is seconds since 1970 or an "
                            f"ISO 8601 date){hint}")
    if not times or config.min_seq_len == 0:
        return
    low, high = min(times), max(times)
    if high < _NEAR_EPOCH and high - low < config.window_seconds:
        raise LogCheckError("columns", f"timestamp is {column}, whose values run {low} to "
                            f"{high} in the first and last rows: not a time (seconds since "
                            "1970, or ISO 8601 dates), and every user's events would fall "
                            f"in one window of window_seconds={config.window_seconds}, so no "
                            f"request could have an earlier event{hint}")


def _time_column_hint(config, names, position):
    """`" (did you mean columns=...?)"` with the timestamp role moved to the header's
    column named like a time, when there is one."""
    for other, name in enumerate(names):
        if other != position and name.lower() in _TIME_NAMES:
            roles = list(config.columns)
            roles[position], roles[other] = roles[other], roles[position]
            return f" (did you mean columns={','.join(roles)}?)"
    return ""

