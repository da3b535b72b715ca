"""One user's request from raw log rows, built as `ifa-data from-log` builds its records.

    builder = RequestBuilder("data/log")              # a dataset `ifa-data from-log` wrote
    features = builder.build(history=rows, candidates=["B00X", "B00Y"], time=1700000000)
    model(features)                                    # or client.rank(features)

The builder reads the converter's settings from the dataset's `metadata.json` (columns,
actions, `max_seq_len`, the item table) and applies the converter's own functions to the
user's rows: the same parsing (fields stripped, timestamps as numbers or ISO 8601, action
values through the `actions` rules), the same id mapping (`encode_ids`: positive integers
kept, other values `string_id`), rows of one (item, time) merged, the sequence = the events
strictly before `time`, oldest first, the most recent `max_seq_len` kept, and the cross
features (`records.cross_counts`). So for a user and time the converter wrote a request for,
`build` gives that request's features (its candidates in the order given).
"""

import dataclasses
import os
import time as time_lib
from collections.abc import Mapping

import numpy as np

from ifa_tf.data import log_converter, records


class RequestBuilder:
    """Builds requests for a model trained on a dataset written by `ifa-data from-log`.

    Args:
        dataset: the dataset's directory or its `metadata.json`.
        item_table: the item table, when the one the converter read (recorded in the
            metadata) has moved; ignored for logs with a category column.
        categories: `{raw item id: raw category}` for items the item table or the rows do
            not give a category (logs with a category column: candidates not in the rows;
            `categories_of(log rows)` makes it from the log, as the converter does).
    """

    def __init__(self, dataset, item_table=None, categories=None):
        metadata = records.read_metadata(os.fspath(dataset))
        if "converter" not in metadata:
            raise ValueError(f"{dataset} was not written by `ifa-data from-log` (its "
                             "metadata records no converter settings); RequestBuilder "
                             "builds requests for converted logs.")
        fields = {f.name for f in dataclasses.fields(log_converter.LogConfig)}
        settings = {k: v for k, v in metadata["converter"].items() if k in fields}
        if item_table is not None:
            settings["item_table"] = os.fspath(item_table)
        elif settings.get("item_table") and not os.path.exists(settings["item_table"]):
            settings["item_table"] = _beside_source(settings["item_table"], metadata)
        self.config = log_converter.LogConfig(**settings)
        self.schema = records.schema_from_metadata(metadata)
        self.rules = self.config.action_rules
        self.categories = {}
        if self.config.item_table:
            if not os.path.exists(self.config.item_table):
                raise FileNotFoundError(
                    f"{self.config.item_table}: the item table the converter read is not "
                    "there; pass item_table= (its new path).")
            self.categories.update(log_converter.read_item_table(self.config))
        self.categories.update(categories or {})

    def parse(self, rows):
        """Log rows -> `(user, items, categories, timestamps, action bits)`, raw values.

        A row is a sequence of fields in the log's column order (as `csv.reader` gives
        them) or a mapping keyed by role (`item`, `timestamp`, optionally `user`, `action`,
        `category`). A bad row raises ValueError naming it and its field."""
        columns = self.config.columns
        users, items, categories, times, bits = [], [], [], [], []
        for index, row in enumerate(rows):
            if isinstance(row, Mapping):
                values = {role: str(value).strip() for role, value in row.items()}
                unknown = sorted(set(values) - set(log_converter.ROLES))
                if unknown:
                    raise ValueError(f"history row {index}: unknown roles {unknown}; valid "
                                     f"roles: {list(log_converter.ROLES[:-1])}")
            else:
                row = list(row)
                if len(row) != len(columns):
                    raise ValueError(f"history row {index}: {len(row)} fields, expected "
                                     f"{len(columns)} (columns={','.join(columns)})")
                values = {role: str(value).strip() for role, value in zip(columns, row)
                          if role != "_"}
            try:
                for role in ("item", "timestamp"):
                    if not values.get(role):
                        raise ValueError(f"empty {role}")
                times.append(log_converter.parse_timestamp(values["timestamp"]))
                bits.append(self.rules(values.get("action", "")))
            except ValueError as error:
                raise ValueError(f"history row {index}: {error}. Received: {row!r}") from None
            users.append(values.get("user", ""))
            items.append(values["item"])
            categories.append(values.get("category") or None)
        return users, items, categories, times, bits

    def build(self, history, candidates, time=None, user=None, raw=False):
        """The features of one request, batched (B = 1), ready for a model or a client.

        Args:
            history: the user's log rows (see `parse`), in log order; rows at or after
                `time` are ignored, as the converter ignores them.
            candidates: raw item ids to rank, in the order the features list them.
            time: the request time (seconds since the epoch, or an ISO 8601 date);
                default: now.
            user: the raw user id; default: the rows' user column.
            raw: id features as raw strings (for the `serving_raw` signature) instead of
                int64 ids.

        Returns:
            `{feature: np.ndarray}`: user features [1], sequence and candidate features
            [1, n] / [1, m], int64 (with `raw`, the id features are object arrays of str).
        """
        users, items, row_categories, times, bits = self.parse(history)
        given = sorted({u for u in users if u})
        if user is None:
            if len(given) != 1:
                raise ValueError("Pass user=: the history rows name "
                                 f"{'no user' if not given else f'several users {given}'}.")
            user = given[0]
        user = str(user).strip()
        others = [u for u in given if u != user]
        if others:
            raise ValueError(f"history rows of other users {others}; pass only user {user!r}'s "
                             "rows.")
        candidates = [str(c).strip() for c in candidates]
        if not candidates or not all(candidates):
            raise ValueError(f"candidates must be non-empty raw item ids. Received: "
                             f"{candidates!r}")
        now = int(time_lib.time()) if time is None else log_converter.parse_timestamp(
            str(time))

        request_time = np.int64(now)
        item_ids, _ = log_converter.encode_ids(items)
        if items:
            timeline = log_converter._merge_and_sort(
                np.zeros(len(items), np.int64), item_ids, np.array(times, np.int64),
                np.array(bits, np.int64), np.arange(len(items), dtype=np.int64))
            event_items, event_times, event_bits = timeline.item, timeline.time, timeline.bits
        else:
            event_items = event_times = event_bits = np.zeros(0, np.int64)
        earlier = int(np.searchsorted(event_times, request_time, "left"))
        history_slice = slice(max(0, earlier - self.config.max_seq_len), earlier)
        seq_items = event_items[history_slice]
        raw_of = dict(zip(item_ids.tolist(), items))
        request = {"user_id": np.int64(log_converter.encode_ids([user])[0][0]),
                   "seq_item_id": seq_items,
                   "seq_action": event_bits[history_slice],
                   "seq_time_delta": request_time - event_times[history_slice],
                   "cand_item_id": log_converter.encode_ids(candidates)[0]}
        raw_request = {"user_id": user,
                       "seq_item_id": [raw_of[i] for i in seq_items.tolist()],
                       "cand_item_id": candidates}
        if "category_id" in self.schema.item_attributes:
            first_category = {}
            for item, category in zip(items, row_categories):
                if category is not None:
                    first_category.setdefault(item, category)
            for side in ("seq", "cand"):
                names = raw_request[f"{side}_item_id"]
                categories = [self._category(item, first_category) for item in names]
                raw_request[f"{side}_category_id"] = categories
                request[f"{side}_category_id"] = log_converter.encode_ids(categories)[0]
        request.update(records.cross_counts(request, self.schema))
        missing = [n for n in self.schema.feature_names if n not in request]
        if missing:
            raise ValueError(f"The dataset's schema declares features a log does not give: "
                             f"{missing}")
        features = {}
        for name in self.schema.feature_names:
            if raw and name in raw_request:
                value = np.array(raw_request[name], dtype=object)
            else:
                value = np.asarray(request[name], dtype=np.int64)
            features[name] = value[np.newaxis]
        return features

    def encode_user(self, user):
        """The int64 id of a raw user id, as the converter maps it (`user_id` of a request;
        the key `ifa-state build --log` stores the user's state under)."""
        return int(log_converter.encode_ids([str(user).strip()])[0][0])

    def categories_of(self, rows):
        """`{raw item: raw category}` of log rows (see `parse`): each item's first category,
        the converter's rule. For a log with a category column, pass it as `categories=`
        so that candidates the user's rows never show get the converter's category."""
        _, items, categories, _, _ = self.parse(rows)
        first = {}
        for item, category in zip(items, categories):
            if category is not None:
                first.setdefault(item, category)
        return first

    def _category(self, item, first_category):
        category = self.categories.get(item, first_category.get(item))
        if category is None:
            raise ValueError(f"No category for item {item!r}: it is not in the item table "
                             "or the history rows; pass categories={item: category}.")
        return category


def _beside_source(item_table, metadata):
    """A preset's item table recorded by a relative path: the same file name in the
    directory the converter read (recorded absolute), when it is there."""
    # The converter records the log's absolute path at the metadata's top level ("source"
    # holds the word "log").
    source = metadata.get("log")
    if not source:
        return item_table
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    moved = os.path.join(directory, os.path.basename(item_table))
    return moved if os.path.exists(moved) else item_table


def pad_requests(requests):
    """Stacks single-user requests (`RequestBuilder.build` outputs) into one batch, padding
    n and m with 0 (or "" for raw ids)."""
    names = list(requests[0])
    batch = {}
    for name in names:
        values = [r[name][0] for r in requests]
        if np.ndim(values[0]) == 0:
            batch[name] = np.array(values, dtype=requests[0][name].dtype)
            continue
        width = max(len(v) for v in values)
        fill = "" if requests[0][name].dtype == object else 0
        padded = np.full((len(values), width), fill, dtype=requests[0][name].dtype)
        for row, value in enumerate(values):
            padded[row, :len(value)] = value
        batch[name] = padded
    return batch


__all__ = ["RequestBuilder", "pad_requests"]
