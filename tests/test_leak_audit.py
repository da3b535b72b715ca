"""Candidate sets that carry no label, and the leak audit that checks them: the audit's
figures against a brute-force NumPy reference, a fixed set size (the earlier composition
fails the audit), exclusion of the user's past items, re-engaged positives kept (the
simulator's sets are checked in test_data_simulator)."""


import numpy as np
import pytest

from ifa_tf.data import leak_audit, log_converter
from test_data_converter import _read_all

DAY = 86_400


# ---------------------------------------------------------------------- the audit itself
def _pairwise_auc(labels, scores):
    """AUC by comparing every positive with every negative (ties one half)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    difference = scores[labels][:, None] - scores[~labels][None, :]
    return float(np.mean((difference > 0) + 0.5 * (difference == 0)))


def _reference_gauc(requests, scores, task):
    total = weight = 0.0
    for request, score in zip(requests, scores):
        labels = request[task]
        if 0 < labels.sum() < len(labels):
            total += _pairwise_auc(labels, score) * len(labels)
            weight += len(labels)
    return total / weight


def test_audit_matches_a_numpy_reference_on_a_hand_made_example():
    train = [{"cand_item_id": np.array([1, 2, 3, 9]), "impression": np.array([1, 1, 0, 1])},
             {"cand_item_id": np.array([1, 2, 4]), "impression": np.array([1, 1, 1])},
             {"cand_item_id": np.array([3, 4, 5]), "impression": np.array([1, 1, 0])}]
    test = [{"cand_item_id": np.array([1, 2, 3, 5]), "seq_item_id": np.array([3, 7]),
             "impression": np.array([1, 1, 0, 0]), "click": np.array([1, 0, 0, 0])},
            {"cand_item_id": np.array([4, 2, 6]), "seq_item_id": np.array([4, 4, 2]),
             "impression": np.array([1, 0, 1]), "click": np.array([0, 0, 1])}]
    audit = leak_audit.LeakAudit(("impression", "click"), sketch_dim=4096)
    for request in train:
        audit.add_train(request)
    for request in test:
        audit.add_test(request)
    result = audit.result()

    # Popularity: positives of the train requests (item 1: 2, 2: 2, 3: 1, 4: 2, 9: 1).
    counts = {1: 2, 2: 2, 3: 1, 4: 2, 5: 0, 6: 0}
    # Co-occurrence: exact cosine of the items' train incidence vectors (which train
    # requests held each as a positive), summed over the other candidates of the set.
    incidence = {item: np.array([item in r["cand_item_id"][r["impression"] == 1]
                                 for r in train], np.float64) for item in counts}

    def cosine(a, b):
        norm = np.linalg.norm(incidence[a]) * np.linalg.norm(incidence[b])
        return incidence[a] @ incidence[b] / norm if norm else 0.0

    expected_scores = {
        "set_size": [np.full(len(r["cand_item_id"]), float(len(r["cand_item_id"])))
                     for r in test],
        "popularity": [np.array([counts[i] for i in r["cand_item_id"]], np.float64)
                       for r in test],
        "set_popularity": [np.full(len(r["cand_item_id"]),
                                   np.mean([counts[i] for i in r["cand_item_id"]]))
                           for r in test],
        "in_history": [np.isin(r["cand_item_id"], r["seq_item_id"]).astype(np.float64)
                       for r in test],
        "cooccurrence": [np.array([sum(cosine(a, b) for b in r["cand_item_id"] if b != a)
                                   for a in r["cand_item_id"]]) for r in test],
    }
    assert result["num_requests"] == 2 and result["num_candidates"] == 7
    for name, scores in expected_scores.items():
        for task in ("impression", "click"):
            labels = np.concatenate([r[task] for r in test])
            got = result["scores"][name][task]
            assert got["auc"] == pytest.approx(
                _pairwise_auc(labels, np.concatenate(scores)), abs=1e-4), (name, task)
            assert got["gauc"] == pytest.approx(_reference_gauc(test, scores, task),
                                                abs=1e-4), (name, task)
    # The base rate oracle: each request's own positive rate of the task.
    for task in ("impression", "click"):
        labels = np.concatenate([r[task] for r in test])
        rates = np.concatenate([np.full(len(r[task]), r[task].mean()) for r in test])
        assert result["scores"]["base_rate_oracle"][task]["auc"] == pytest.approx(
            _pairwise_auc(labels, rates), abs=1e-4), task
    # The set size and the base rate are constants within a request: GAUC 0.5 whatever.
    assert result["scores"]["set_size"]["click"]["gauc"] == 0.5
    assert result["scores"]["base_rate_oracle"]["click"]["gauc"] == 0.5


def test_set_size_warning_names_the_tasks_outside_the_tolerance():
    audit = {"scores": {"set_size": {"impression": {"auc": 0.859, "gauc": 0.5},
                                     "click": {"auc": 0.505, "gauc": 0.5}}}}
    warning = leak_audit.set_size_warning(audit)
    assert "impression 0.859" in warning and "click" not in warning
    audit["scores"]["set_size"]["impression"]["auc"] = 0.509
    assert leak_audit.set_size_warning(audit) is None


def test_audit_rejects_a_bad_argument():
    with pytest.raises(ValueError, match="positive_task=.*'nope'"):
        leak_audit.LeakAudit(("impression",), positive_task="nope")
    with pytest.raises(ValueError, match="sketch_dim=0"):
        leak_audit.LeakAudit(("impression",), sketch_dim=0)


# ------------------------------------------------------------------------ converted logs
def _busy_log(path, seed=0, num_users=20, num_days=12, num_items=300):
    """A log whose day windows hold from 1 to 12 events: set sizes that follow the window
    would tell the positives apart."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("user,item,ts\n")
        for user in range(num_users):
            for day in range(num_days):
                for _ in range(int(rng.integers(1, 13))):
                    f.write(f"u{user},{int(rng.integers(1, num_items))},"
                            f"{day * DAY + int(rng.integers(0, DAY // 2))}\n")
    return str(path)


def _convert(tmp_path, name, **overrides):
    config = log_converter.LogConfig(**{"columns": "user,item,timestamp", "num_negatives": 10,
                                        "max_candidates": 30, "test_fraction": 0.3,
                                        **overrides})
    return log_converter.convert_log(_busy_log(tmp_path / "log.csv"), str(tmp_path / name),
                                     config)


@pytest.mark.parametrize("negatives", log_converter.NEGATIVE_SAMPLERS)
def test_a_fixed_set_size_carries_no_label(tmp_path, negatives):
    metadata = _convert(tmp_path, negatives, negatives=negatives)
    for split in ("train", "test"):
        for request in _read_all(str(tmp_path / negatives), split):
            assert len(request["cand_item_id"]) == 30
            assert len(set(request["cand_item_id"].tolist())) == 30  # distinct
            assert 1 <= request["impression"].sum() <= 20  # room for 10 negatives
    assert metadata["leak_audit"]["scores"]["set_size"]["impression"]["auc"] == 0.5
    assert metadata["negative_fallbacks"] == 0
    assert leak_audit.set_size_warning(metadata["leak_audit"]) is None


def test_the_earlier_composition_fails_the_audit_and_is_reproducible(tmp_path, caplog):
    metadata = _convert(tmp_path, "old", fixed_set_size=False, negatives="popularity")
    requests = _read_all(str(tmp_path / "old"), "test")
    # m = window items + 10: the size counts the positives.
    assert all(len(r["cand_item_id"]) == r["impression"].sum() + 10 for r in requests)
    assert metadata["leak_audit"]["scores"]["set_size"]["impression"]["auc"] > 0.6
    assert "set size alone scores pooled AUC impression" in caplog.text


def _day_log(path, num_users=12, num_days=5, reclick=False, seed=0):
    """Every user rates items 1-10 on day 0 (so they are popular), then two items of
    11-80 a day, never one twice; with `reclick`, the user clicks on day 3 again an item of
    day 1. Returns `{(user id, item id): [days]}`."""
    rng = np.random.default_rng(seed)
    days = {}
    with open(path, "w") as f:
        f.write("user,item,ts\n")
        for user in range(num_users):
            later = rng.choice(np.arange(11, 81), 2 * (num_days - 1), replace=False)
            plan = [(0, item) for item in range(1, 11)]
            plan += [(1 + i // 2, int(item)) for i, item in enumerate(later)]
            if reclick:
                plan.append((3, int(later[0])))
            for day, item in plan:
                f.write(f"u{user},{item},{day * DAY + 60 * item}\n")
                days.setdefault((log_converter.string_id(f"u{user}"), item), []).append(day)
    return days


def _day_config(**overrides):
    return log_converter.LogConfig(**{"columns": "user,item,timestamp", "num_negatives": 8,
                                      "window_seconds": DAY // 2,
                                      "max_candidates": 12, "max_seq_len": 3,
                                      "test_fraction": 0.0, **overrides})


def _requests_with_past(output_dir, days):
    """Each written request with the set of items its user met before it (a log without
    re-clicks: a positive's day is the request's)."""
    for request in _read_all(output_dir, "train"):
        user = int(request["user_id"])
        positive = int(request["cand_item_id"][request["impression"] == 1][0])
        (day,) = days[(user, positive)]
        yield request, {item for (u, item), (met,) in days.items() if u == user and met < day}


def test_negatives_exclude_the_users_past_items_when_asked(tmp_path):
    days = _day_log(tmp_path / "log.csv")
    past_in_negatives = {}
    for exclude in (False, True):
        output_dir = str(tmp_path / f"exclude_{exclude}")
        log_converter.convert_log(str(tmp_path / "log.csv"), output_dir,
                                  _day_config(exclude_history=exclude))
        count = 0
        for request, past in _requests_with_past(output_dir, days):
            # max_seq_len 3: the sequence holds only the last 3 of the past items.
            assert set(request["seq_item_id"].tolist()) < past
            count += len(set(request["cand_item_id"][request["impression"] == 0].tolist())
                         & past)
        past_in_negatives[exclude] = count
    # Items 1-10 are the most popular: without the exclusion they are drawn as negatives.
    assert past_in_negatives[False] > 0 and past_in_negatives[True] == 0


@pytest.mark.parametrize("exclude", [False, True])
def test_re_engaged_items_stay_positives(tmp_path, exclude):
    days = _day_log(tmp_path / "log.csv", reclick=True)
    output_dir = str(tmp_path / "out")
    log_converter.convert_log(str(tmp_path / "log.csv"), output_dir,
                              _day_config(exclude_history=exclude, max_seq_len=100))
    reclicked = {(user, item) for (user, item), met in days.items() if met == [1, 3]}
    found = set()
    for request in _read_all(output_dir, "train"):
        user = int(request["user_id"])
        for item, shown in zip(request["cand_item_id"].tolist(),
                               request["impression"].tolist()):
            if shown and (user, item) in reclicked and item in request["seq_item_id"]:
                found.add((user, item))  # the day-3 request: in the history, a positive
    assert found == reclicked and len(reclicked) == 12
