"""The simulator: deterministic by seed, well-formed requests, and the effects it claims
(set-level impressions, long-range and cross-category ground truth) measured."""

import os
import time

import numpy as np
import pytest

from ifa_tf.data import records, simulator

CONFIG = simulator.SimulatorConfig(
    num_requests=40, seed=1, max_seq_len=400, median_seq_len=300, min_seq_len=3,
    max_candidates=40, num_items=2000, num_categories=12, num_topics=16, num_authors=200,
    truth_samples=32, impression_slots=8, category_cap=2)


@pytest.fixture(scope="module")
def sim():
    return simulator.Simulator(CONFIG)


@pytest.fixture(scope="module")
def requests(sim):
    return [sim.request(i) for i in range(CONFIG.num_requests)]


def test_same_seed_same_requests_other_seed_other_requests(requests):
    again = simulator.Simulator(CONFIG)
    for index in (0, 17, 39):
        other = again.request(index)
        for name, value in requests[index].items():
            np.testing.assert_array_equal(other[name], value, err_msg=name)
    reseeded = simulator.Simulator(simulator.SimulatorConfig(
        **{**CONFIG.to_dict(), "seed": 2})).request(0)
    assert not np.array_equal(reseeded["seq_item_id"][:20], requests[0]["seq_item_id"][:20])


def test_written_files_are_identical_for_one_seed(tmp_path):
    config = simulator.SimulatorConfig(num_requests=6, seed=5, max_seq_len=30,
                                       max_candidates=10, num_items=300, num_topics=8,
                                       num_authors=40, num_categories=6, truth_samples=8)
    contents = []
    for run in ("a", "b"):
        simulator.write_synthetic(str(tmp_path / run), config, num_shards=2,
                                  compression="none")
        contents.append({name: open(tmp_path / run / name, "rb").read()
                         for name in sorted(os.listdir(tmp_path / run))})
    assert contents[0] == contents[1]
    assert sorted(contents[0]) == ["metadata.json", "test-00000-of-00001.tfrecord",
                                   "train-00000-of-00002.tfrecord",
                                   "train-00001-of-00002.tfrecord"]


def test_requests_are_well_formed(sim, requests):
    schema = sim.schema
    for request in requests:
        n, m = records.check_request(request, schema)
        assert CONFIG.min_seq_len <= n <= CONFIG.max_seq_len
        assert CONFIG.max_candidates // 2 <= m <= CONFIG.max_candidates
        for name in (*schema.sequence_features[:3], *schema.candidate_features):
            assert (request[name] > 0).all(), name  # 0 is padding only
        assert len(np.unique(request["cand_item_id"])) == m
        deltas = request["seq_time_delta"]
        assert (deltas >= 60).all() and (np.diff(deltas) <= 0).all()  # oldest first
        assert ((request["seq_action"] >= 0) & (request["seq_action"] < 8)).all()
        np.testing.assert_array_equal(request["seq_category_id"],
                                      sim.item_category[request["seq_item_id"]])
        np.testing.assert_array_equal(request["cand_author_id"],
                                      sim.item_author[request["cand_item_id"]])
        for task in ("click", "long_view", "like"):  # actions only on impressions
            assert (request[task] <= request["impression"]).all()
            assert (request["truth_" + task] <= request["truth_impression"] + 1e-7).all()


def test_cross_features_count_sequence_events(requests):
    request = requests[3]
    for attribute in ("author", "category"):
        expected = [np.sum(request[f"seq_{attribute}_id"] == value)
                    for value in request[f"cand_{attribute}_id"]]
        np.testing.assert_array_equal(request[f"cand_cross_{attribute}_count"], expected)
    assert request["cand_cross_category_count"].max() > 0


def test_impressions_respect_slot_budget_and_category_cap(requests):
    for request in requests:
        shown = request["impression"].astype(bool)
        assert shown.sum() == min(CONFIG.impression_slots, len(shown)) or \
            np.bincount(request["cand_category_id"][shown]).max() == CONFIG.category_cap
        assert shown.sum() <= CONFIG.impression_slots
        assert np.bincount(request["cand_category_id"][shown]).max() <= CONFIG.category_cap


def test_impression_probability_depends_on_the_other_candidates(sim, requests):
    request = requests[0]
    candidates = request["cand_item_id"]
    logits = np.zeros(len(candidates))
    target = 0
    category = request["cand_category_id"][target]
    alone = sim.impression_probability(candidates, logits, np.random.default_rng(0))[target]
    # Add category_cap items of the same category that the policy ranks far higher.
    rivals = np.setdiff1d(np.flatnonzero(sim.item_category == category), candidates)
    crowded = np.concatenate([candidates, rivals[:CONFIG.category_cap]])
    crowded_logits = np.concatenate([logits, np.full(CONFIG.category_cap, 20.0)])
    with_rivals = sim.impression_probability(crowded, crowded_logits,
                                             np.random.default_rng(0))[target]
    assert alone > 0.05
    assert with_rivals == 0.0


def test_truth_depends_on_old_events_outside_the_candidate_category(sim, requests):
    """Removing the events that are older than the most recent 100 AND in another category
    than the candidate (what recent-k and same-category retrieval both drop) changes the
    ground truth of many candidates: measured here, not assumed."""
    changes = []
    for request in requests:
        n = len(request["seq_item_id"])
        if n <= 150:
            continue
        full = sim.action_probabilities(request["seq_item_id"], request["seq_action"],
                                        request["seq_time_delta"], request["cand_item_id"])
        old = np.arange(n) < n - 100
        for j, category in enumerate(request["cand_category_id"]):
            keep = ~(old & (request["seq_category_id"] != category))
            cut = sim.action_probabilities(request["seq_item_id"][keep],
                                           request["seq_action"][keep],
                                           request["seq_time_delta"][keep],
                                           request["cand_item_id"][j:j + 1])
            changes.append(abs(cut["click"][0] - full["click"][j]))
    changes = np.array(changes)
    assert len(changes) > 300
    assert (changes > 0.02).mean() > 0.25


def test_topics_span_categories_and_dormant_interests_exist(sim, requests):
    assert np.mean([len(c) > 1 for c in sim.topic_categories]) > 0.5
    dormant_users = 0
    for request in requests:
        topics = sim.item_topic[request["seq_item_id"]]
        if len(topics) < 200:
            continue
        recent = set(topics[-100:].tolist())
        old_counts = np.bincount(topics[:-100])
        dormant_users += any(count >= 5 and topic not in recent
                             for topic, count in enumerate(old_counts))
    assert dormant_users >= 3


def test_signal_categories_reveal_the_target_interest(sim, requests):
    effects = []
    for request in requests:
        signal = np.isin(request["seq_category_id"], sim.signal_categories)
        target = np.isin(request["cand_category_id"], sim.target_categories)
        if signal.sum() < 5 or not target.any():
            continue
        args = [request[k] for k in ("seq_item_id", "seq_action", "seq_time_delta")]
        with_signal = sim.action_logits(*args, request["cand_item_id"])["click"]
        without = sim.action_logits(*[a[~signal] for a in args], request["cand_item_id"])
        effects.append((with_signal - without["click"])[target].mean()
                       - (with_signal - without["click"])[~target].mean())
    assert len(effects) >= 2
    assert min(effects) > 0.5


def test_labels_follow_the_ground_truth(tmp_path):
    config = simulator.SimulatorConfig(
        num_requests=120, seed=4, max_seq_len=80, max_candidates=30, num_items=1000,
        num_categories=8, num_topics=12, num_authors=100, truth_samples=64,
        test_fraction=0.5)
    metadata = simulator.write_synthetic(str(tmp_path), config, num_shards=1)
    for split in ("train", "test"):
        stats = metadata["splits"][split]
        assert 0.8 < stats["truth_auc"]["click"] <= 1.0
        assert stats["label_rate"]["click"] < stats["label_rate"]["impression"]
    sim = simulator.Simulator(config)
    rows = [sim.request(i) for i in range(config.num_requests)]
    for task in simulator.TASKS:
        labels = np.concatenate([r[task] for r in rows])
        truth = np.concatenate([r["truth_" + task] for r in rows])
        standard_error = np.sqrt(truth.mean() / len(labels))
        assert abs(labels.mean() - truth.mean()) < 4 * standard_error + 0.005, task


def test_auc_matches_pairwise_definition():
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.3, 0.3, 0.1, 0.5, 0.8])
    pairs = [(p, q) for p in scores[labels == 1] for q in scores[labels == 0]]
    expected = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert simulator.auc(labels, scores) == pytest.approx(expected)
    assert simulator.auc([0, 0], [0.1, 0.2]) is None


@pytest.mark.parametrize("field, value, message", [
    ("num_requests", 0, "num_requests=0"),
    ("min_seq_len", 500, "min_seq_len must be <= max_seq_len"),
    ("retrieval_mix", (0.5, 0.5, 0.5), "retrieval_mix="),
    ("num_categories", 3, "num_categories=3"),
    ("test_fraction", 1.0, "test_fraction=1.0"),
    ("truth", "share", "truth=.share."),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        simulator.SimulatorConfig(**{**CONFIG.to_dict(), field: value})


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="num_request"):
        simulator.SimulatorConfig.from_dict({"num_request": 3})


# A lifelong world shrunk to test size: n in the hundreds, k = 20.
TINY_LIFELONG = simulator.lifelong_config(
    num_requests=60, seed=3, median_seq_len=200, min_seq_len=50, max_seq_len=400,
    max_candidates=30, num_items=1500, num_authors=150, num_topics=16,
    num_categories=12, truth_samples=16, test_fraction=0.5, ladder_k=20)


def test_ceiling_ladder_and_leak_audit_are_in_the_metadata(tmp_path):
    metadata = simulator.write_synthetic(str(tmp_path), TINY_LIFELONG, num_shards=1)
    # A fixed set size: the set's size tells nothing of the labels.
    audit = metadata["leak_audit"]
    assert audit["num_candidates"] == 30 * audit["num_requests"] == 30 * 30
    assert {task: v["auc"] for task, v in audit["scores"]["set_size"].items()} == {
        task: 0.5 for task in simulator.TASKS}
    for split in ("train", "test"):
        ladder = simulator.read_ceiling_ladder(str(tmp_path), split)
        assert ladder == metadata["splits"][split]["ceiling_ladder"]
        assert ladder["k"] == 20
        assert [rung["name"] for rung in ladder["rungs"]] == list(simulator.LADDER_RUNGS)
        assert ladder["rungs"][1]["history"] == "last 20 events (din)"
        aucs = {rung["name"]: rung["truth_auc"] for rung in ladder["rungs"]}
        for task in ("click", "long_view", "like"):
            # The full rung is the ground truth itself.
            assert aucs["full"][task] == pytest.approx(
                metadata["splits"][split]["truth_auc"][task], abs=1e-4)
        for rung in ("last_k", "category_last_k", "topic_top_k"):
            assert aucs["full"]["click"] > aucs[rung]["click"] > aucs["none"]["click"], rung
            assert (np.mean([aucs["full"][t] for t in ("click", "long_view", "like")])
                    > np.mean([aucs[rung][t] for t in ("click", "long_view", "like")]))
    table = simulator.format_ceiling_ladder(ladder, tasks=["click"]).splitlines()
    assert table[0] == "| ceiling ladder: truth recomputed from | click |"
    assert table[2] == f"| whole history (the ground truth) | {aucs['full']['click']:.4f} |"
    assert table[-1] == f"| no history | {aucs['none']['click']:.4f} |"


def test_read_ceiling_ladder_of_unknown_split_or_converted_log():
    with pytest.raises(ValueError, match="split='valid'"):
        simulator.read_ceiling_ladder({"splits": {"train": {}}}, "valid")
    assert simulator.read_ceiling_ladder({"splits": {"test": {"num_requests": 3}}}) is None


def _hand_built_request(sim, items, candidates):
    n = len(items)
    return {"seq_item_id": np.asarray(items, np.int64),
            "seq_action": np.arange(n, dtype=np.int64) % 8,
            "seq_time_delta": (60 + 86_400 * np.arange(n)[::-1]).astype(np.int64),
            "cand_item_id": np.asarray(candidates, np.int64),
            "truth_impression": np.linspace(0.2, 0.9, len(candidates)).astype(np.float32)}


@pytest.mark.parametrize("truth", simulator.TRUTHS)
def test_a_rung_that_holds_every_event_is_the_full_truth(truth):
    """Fewer than k events, all in the first candidate's category and topic: every
    restricted rung of that candidate is exactly its full truth; the second candidate, of
    another category and topic, sees nothing through those rungs: the no-history truth."""
    sim = simulator.Simulator(simulator.SimulatorConfig(**{**TINY_LIFELONG.to_dict(),
                                                           "truth": truth}))
    first = int(np.flatnonzero(~sim.is_signal[1:])[0]) + 1
    alike = np.flatnonzero((sim.item_category == sim.item_category[first])
                           & (sim.item_topic == sim.item_topic[first]))
    other = int(np.flatnonzero((sim.item_category != sim.item_category[first])
                               & (sim.item_topic != sim.item_topic[first]))[0])
    items = alike[np.arange(15) % len(alike)]
    ladder = sim.ceiling_ladder(_hand_built_request(sim, items, [first, other]))
    for task in ("click", "long_view", "like"):
        for rung in ("last_k", "category_last_k", "topic_top_k"):
            assert ladder[rung][task][0] == ladder["full"][task][0], (rung, task)
        for rung in ("category_last_k", "topic_top_k"):
            assert ladder[rung][task][1] == ladder["none"][task][1], (rung, task)
        assert ladder["none"][task][0] != ladder["full"][task][0]


def test_counts_truth_needs_only_the_events_that_match_the_candidate():
    """The counts truth sums over matching events: with more than k events, of which fewer
    than k (and old ones) share the candidate's topic and none is a signal event, the topic
    rung is exact while the last k events miss the old ones."""
    sim = simulator.Simulator(TINY_LIFELONG)
    candidate = int(np.flatnonzero(~sim.is_signal[1:])[0]) + 1
    topic = sim.item_topic == sim.item_topic[candidate]
    same_topic = np.flatnonzero(topic & ~sim.is_signal)[:10]
    elsewhere = np.flatnonzero(~topic & ~sim.is_signal & (sim.item_topic > 0))
    items = np.concatenate([same_topic, elsewhere[np.arange(60) % 40]])
    assert len(items) > 3 * TINY_LIFELONG.ladder_k
    ladder = sim.ceiling_ladder(_hand_built_request(sim, items, [candidate]))
    for task in ("click", "long_view", "like"):
        assert ladder["topic_top_k"][task][0] == pytest.approx(ladder["full"][task][0],
                                                               rel=1e-12)
        assert ladder["last_k"][task][0] < ladder["full"][task][0] - 1e-3


def test_lifelong_preset_is_what_it_documents():
    config = simulator.preset_config("lifelong")
    assert config == simulator.lifelong_config()
    assert (config.max_seq_len, config.truth, config.ladder_k) == (10_000, "counts", 100)
    assert simulator.preset_config("lifelong", num_requests=7).num_requests == 7
    sim = simulator.Simulator(config)
    started = time.perf_counter()
    requests = [sim.request(i) for i in range(24)]
    ladders = [sim.ceiling_ladder(request) for request in requests]
    elapsed = time.perf_counter() - started
    lengths = [len(request["seq_item_id"]) for request in requests]
    assert np.median(lengths) >= 1_000 and max(lengths) <= 10_000
    assert max(lengths) > 2_000  # the heavy tail shows even in a small sample
    # ~50 ms a request with its ladder: 5,000 requests in minutes; generous on a busy CPU.
    assert elapsed < 30.0
    assert all(set(ladder) == set(simulator.LADDER_RUNGS) for ladder in ladders)
    with pytest.raises(ValueError, match="Unknown simulator preset 'lifelon'"):
        simulator.preset_config("lifelon")
