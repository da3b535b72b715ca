"""A lifelong-behaviour simulator whose ground truth carries what sampling-based models lose.

The world (fixed by the seed):
- items with a category, an author and a latent topic; a topic spans one to three categories
  (a "cat" topic spans anime and pets), so retrieving history by the candidate's category
  misses relevant events; authors publish within one topic; items have a popularity, a
  quality and a long-form propensity.
- two "signal" categories and two unrelated "target" categories: users with a latent trait
  (say, parents) leave events in the signal categories, and their interest in the target
  categories shows nowhere else in their history (with `truth="counts"` the trait moves
  every topic's appeal, each by its own sign and size).

A request (fixed by the seed and its index, so any subset is generated identically):
- a user with two to five latent interests (topics), each active in a window of the user's
  timeline; "dormant" interests are active only in the old part and absent from the recent
  part (interest drift), plus exploration of popular items;
- a lifelong sequence with a log-normal (heavy-tailed) length capped at `max_seq_len`,
  events denser towards the present, per-event action bits and time deltas;
- a candidate set from a retrieval mix (relevant to lifelong and recent interests, popular,
  random), deduplicated and shuffled;
- impressions chosen by a logging policy that ranks by a noisy score built from the recent
  history only and fills a slot budget under a per-category cap, so p(impression|candidate)
  depends on the other candidates;
- click / long view / like on impressions, sampled from ground-truth p(action|impression)
  that depend on the whole history: topic affinity (across categories, old events decayed
  but never forgotten), author affinity, the trait revealed by the signal categories.

The ground truth is written as the extras `truth_<task>` (p(task|candidate), the quantity a
model predicts: p(impression|candidate) estimated by re-running the logging policy
`truth_samples` times, times the exact p(action|impression)), so the best achievable AUC is
known.

The ceiling ladder (`LADDER_RUNGS`, in every split's metadata, read with
`read_ceiling_ladder`): the truth AUC when the same truth function is recomputed from only
the history that each family of models reads (the last k events, the candidate's category,
the candidate's topic, nothing). It is a plug-in: a model could learn what the missing
events say on average, so a rung is a yardstick rather than a strict bound.

The `lifelong` preset (`lifelong_config`, `--preset=lifelong`) makes the whole sequence
matter: thousands of events, favourite authors and re-engaged items met long ago, and a
ground truth of counts (`truth="counts"`) whose trait evidence lies outside any candidate's
topic. Its parameters and the reason for each are in `lifelong_config`.
"""

import dataclasses
import logging
import math
import os

import numpy as np

from ifa_tf import schema as schema_lib
from ifa_tf.data import leak_audit, records

TRUTH_PREFIX = "truth_"
TASKS = ("impression", "click", "long_view", "like")
ACTION_BITS = {"click": 1, "long_view": 2, "like": 4}
_DAY = 86_400
_REQUEST_TIME_GAP = 60  # seconds between the last event and the request, at least
_EVENT_RECENCY_EXPONENT = 0.6  # event positions u**0.6: denser towards the present
_FAVOURITE_AUTHORS = 2  # per interest, when favourite_author_probability > 0
_logger = logging.getLogger(__name__)
TRUTHS = ("shares", "counts")
# The ceiling ladder: the history each family of models reads ({k}: `ladder_k`), in order.
LADDER_RUNGS = {
    "full": "whole history (the ground truth)",
    "last_k": "last {k} events (din)",
    "category_last_k": "last {k} events of the candidate's category (sim_hard)",
    "topic_top_k": "{k} events of the candidate's topic: same item, same author, then most "
                   "recent first (the best similarity search: twin, sim_soft, eta)",
    "none": "no history",
}
# truth="counts": engagement at which each match term reaches log 2, and each task's weights.
COUNTS_SCALES = {"topic": 100.0, "author": 4.0, "item": 1.0}
COUNTS_WEIGHTS = {
    "click": {"bias": -5.3, "topic": 0.6, "author": 0.6, "item": 0.8, "trait": 3.0,
              "quality": 1.0, "longform": 0.0},
    "long_view": {"bias": -5.3, "topic": 0.5, "author": 0.3, "item": 0.5, "trait": 1.5,
                  "quality": 0.0, "longform": 1.5},
    "like": {"bias": -6.5, "topic": 0.4, "author": 0.9, "item": 0.5, "trait": 2.0,
             "quality": 0.8, "longform": 0.0},
}


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """Parameters of the simulated world and its requests (every field is recorded in the
    dataset metadata).

    Args:
        num_requests: requests generated (one user each; user ids 1..num_requests).
        seed: fixes the world and every request.
        max_seq_len / min_seq_len: bounds of the sequence length n.
        median_seq_len: median of the log-normal length (0: max_seq_len // 5).
        seq_len_sigma: log-normal sigma of n (heavy tail).
        max_candidates / min_candidates: bounds of m (min 0: equal to max_candidates, a
            fixed set size). A set size that varies carries a label signal with the fixed
            `impression_slots` budget (larger sets hold fewer impressions: pooled AUC 0.58
            for set size alone), which ranks nothing within a request; the test split's
            `leak_audit` shows it.
        num_items, num_categories, num_topics, num_authors: vocabulary sizes (ids 1..size).
        dormant_probability: chance that an interest is dormant (old history only).
        trait_probability: share of users with the latent trait.
        explore_probability: share of events on popular items outside the interests.
        signal_probability: share of a trait user's events in the signal categories (of
            every user's, with signal_contrast).
        decay_days: half-weight age of an event in the ground truth (old events keep 35%).
        truth: the ground truth of p(action|impression), see `Simulator.action_logits`:
            "shares" (shares of engagement; the default world) or "counts" (engagement
            counted per matching item, author and topic; the lifelong preset).
        trait_scale: engagement in the signal categories at which the trait effect
            reaches tanh(1) = 76% of its full size.
        signal_contrast: False: only trait users leave signal events, in both signal
            categories. True: trait users leave them in the first signal category, the
            others in the second, exploring never does, and the trait evidence is the
            difference (negative for users without the trait). So a history without signal
            events says nothing either way: with trait_probability 0.5 its truth is the
            population's average, as a model without those events would learn.
        favourite_author_probability: share of an interest's events on one of its two
            favourite authors (chosen per user, uniformly among the topic's authors, so
            which authors they are is specific to the user).
        repeat_probability: share of events that re-engage the item of a uniformly chosen
            earlier event (met long ago, often).
        history_candidate_share: share of the candidates retrieved from the items of the
            user's own history (the rest follows `retrieval_mix`).
        retrieval_mix: shares of relevant, popular and random candidates.
        impression_slots: slot budget of the logging policy.
        category_cap: most impressions per category in one request.
        policy_history: most recent events the logging policy looks at.
        policy_noise: scale of the policy's Gumbel noise.
        truth_samples: policy re-runs that estimate p(impression|candidate).
        history_days: longest history span, days.
        test_fraction: share of requests written to the `test` split.
        ladder_k: k of the ceiling ladder's restricted histories (`LADDER_RUNGS`).
    """

    num_requests: int = 1000
    seed: int = 0
    max_seq_len: int = 1000
    min_seq_len: int = 5
    median_seq_len: int = 0
    seq_len_sigma: float = 1.0
    max_candidates: int = 200
    min_candidates: int = 0
    num_items: int = 20_000
    num_categories: int = 24
    num_topics: int = 48
    num_authors: int = 2_000
    dormant_probability: float = 0.4
    trait_probability: float = 0.3
    explore_probability: float = 0.15
    signal_probability: float = 0.06
    decay_days: float = 180.0
    truth: str = "shares"
    trait_scale: float = 8.0
    signal_contrast: bool = False
    favourite_author_probability: float = 0.0
    repeat_probability: float = 0.0
    history_candidate_share: float = 0.0
    retrieval_mix: tuple = (0.5, 0.3, 0.2)
    impression_slots: int = 12
    category_cap: int = 3
    policy_history: int = 50
    policy_noise: float = 1.0
    truth_samples: int = 128
    history_days: float = 1000.0
    test_fraction: float = 0.1
    ladder_k: int = 100

    def __post_init__(self):
        object.__setattr__(self, "retrieval_mix", tuple(float(v) for v in self.retrieval_mix))
        positive = ("num_requests", "max_seq_len", "min_seq_len", "max_candidates",
                    "num_items", "num_categories", "num_topics", "num_authors",
                    "impression_slots", "category_cap", "policy_history", "truth_samples",
                    "ladder_k")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SimulatorConfig.{name} must be a positive integer. "
                                 f"Received: {name}={value!r}")
        for name in ("median_seq_len", "min_candidates", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SimulatorConfig.{name} must be an integer >= 0. "
                                 f"Received: {name}={value!r}")
        for name in ("dormant_probability", "trait_probability", "explore_probability",
                     "signal_probability", "favourite_author_probability",
                     "repeat_probability", "history_candidate_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimulatorConfig.{name} must be in [0, 1]. "
                                 f"Received: {name}={value!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"SimulatorConfig.test_fraction must be in [0, 1). "
                             f"Received: test_fraction={self.test_fraction!r}")
        if self.truth not in TRUTHS:
            raise ValueError(f"SimulatorConfig.truth must be one of {list(TRUTHS)}. "
                             f"Received: truth={self.truth!r}")
        for name in ("seq_len_sigma", "decay_days", "policy_noise", "history_days",
                     "trait_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SimulatorConfig.{name} must be > 0. "
                                 f"Received: {name}={getattr(self, name)!r}")
        if self.min_seq_len > self.max_seq_len:
            raise ValueError(f"SimulatorConfig.min_seq_len must be <= max_seq_len. Received: "
                             f"min_seq_len={self.min_seq_len}, max_seq_len={self.max_seq_len}")
        if self.min_candidates > self.max_candidates:
            raise ValueError(f"SimulatorConfig.min_candidates must be <= max_candidates. "
                             f"Received: min_candidates={self.min_candidates}, "
                             f"max_candidates={self.max_candidates}")
        if self.num_categories < 4:
            raise ValueError("SimulatorConfig.num_categories must be >= 4 (two signal and two "
                             f"target categories). Received: num_categories="
                             f"{self.num_categories}")
        if self.num_items < max(self.num_topics, self.max_candidates):
            raise ValueError(
                "SimulatorConfig.num_items must be >= num_topics and >= max_candidates. "
                f"Received: num_items={self.num_items}, num_topics={self.num_topics}, "
                f"max_candidates={self.max_candidates}")
        if self.num_authors < self.num_topics:
            raise ValueError(f"SimulatorConfig.num_authors must be >= num_topics. Received: "
                             f"num_authors={self.num_authors}, num_topics={self.num_topics}")
        mix = self.retrieval_mix
        if len(mix) != 3 or min(mix) < 0 or not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
            raise ValueError("SimulatorConfig.retrieval_mix must be three non-negative shares "
                             f"(relevant, popular, random) summing to 1. Received: "
                             f"retrieval_mix={mix!r}")

    @property
    def resolved_median_seq_len(self):
        return self.median_seq_len or max(self.min_seq_len, self.max_seq_len // 5)

    @property
    def resolved_min_candidates(self):
        return self.min_candidates or self.max_candidates

    @property
    def num_test_requests(self):
        return int(round(self.num_requests * self.test_fraction))

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, config):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown SimulatorConfig keys {unknown}. Valid keys: "
                             f"{sorted(known)}")
        return cls(**config)


def lifelong_config(**overrides):
    """The `lifelong` preset (`ifa-data synthetic --preset=lifelong`): sequences in the
    thousands and a ground truth that rewards reading all of them. `overrides` replace any
    field. The world is calibrated by the ceiling ladder alone, never by model results
    (`zoo/RESULTS.md` gives the ladder it reaches); the size by whether models learn at all.

    Size (one at which models learn the matches: with 5,000 requests every model, exact
    attention included, sat at the mean of the sequence; `benchmarks/results/
    lifelong_pilot/` and `lifelong_20k/`):
    - num_requests=20,000, test_fraction=0.2: 16,000 training requests (about 190,000
      labelled impressions) and 4,000 test requests; about 8 minutes to write on a 2-core
      CPU; a zoo model trains 2 epochs on them in 3 (`avg_pooling`) to 10 minutes.
    - median_seq_len=1,200, seq_len_sigma=0.8, min_seq_len=100, max_seq_len=10,000: median
      n about 1,150, mean about 1,550, and a tail that reaches the paper's 10,000.
    - max_candidates=40 in every request (a fixed set size: its size tells nothing of its
      labels): the O(mn) reference models stay affordable.
    - num_items=5,000, num_authors=1,000 (48 topics and 24 categories as by default): about
      forty labelled impressions per item and two hundred per author in training, so
      embeddings can be learned, and still ids by the thousand, so a match on an item or an
      author met long ago is a needle that a pooled vector blurs.

    History (what a model has to find):
    - favourite_author_probability=0.3: each interest has two favourite authors of the
      user's own (uniform among the topic's authors, not its most popular ones), who get
      30% of its events.
    - repeat_probability=0.08: 8% of events re-engage an item met earlier (uniformly over
      the past, so mostly long ago).
    - history_candidate_share=0.2: a fifth of the candidates are items of the user's own
      history, so those re-engagements are tested.
    - dormant_probability=0.5: half of the secondary interests live only in the old part
      of the history, out of sight of the last 100 events.
    - signal_contrast=True, trait_probability=0.5, signal_probability=0.05,
      trait_scale=40: every user leaves 5% of the events in one of two signal categories
      (one per side of the trait; about 60 events at n = 1,200, 5 among the last 100), in
      no topic of theirs; about 40 units of engagement (some 35 events) make the trait
      show (tanh(1)). The evidence accumulates over the whole life and lies outside the
      candidate's topic, beyond any top-k of it; with both sides equally likely a history
      without those events says nothing either way.

    Truth:
    - truth="counts": engagement counted per matching topic, author and item, and the
      trait acting on every topic with a topic-specific sign and size (see
      `Simulator.action_logits`): counts keep growing past k events, and a history
      restricted to the events that match a candidate gives its exact truth.
    - decay_days=720: events two years old keep two thirds of their weight (the default
      180 days leaves 35%), so what a user did long ago still matters.
    """
    return SimulatorConfig(**{**_LIFELONG, **overrides})


_LIFELONG = dict(
    num_requests=20_000, test_fraction=0.2, median_seq_len=1_200, seq_len_sigma=0.8,
    min_seq_len=100, max_seq_len=10_000, max_candidates=40,
    num_items=5_000, num_authors=1_000, favourite_author_probability=0.3,
    repeat_probability=0.08, history_candidate_share=0.2, dormant_probability=0.5,
    signal_contrast=True, trait_probability=0.5, signal_probability=0.05, trait_scale=40.0,
    truth="counts", decay_days=720.0)


def short_config(**overrides):
    """The `short` preset (`ifa-data synthetic --preset=short`): the lifelong world (its
    users, items, re-engagement and truth) seen through short histories, a median of 30
    events and at most 150, as in logs that keep a user's last weeks. It checks that a
    model built for thousands of events does not lose where there are few: the last events
    and the re-engaged items are then most of what there is to read. `overrides` replace
    any field."""
    return lifelong_config(**{**_SHORT, **overrides})


_SHORT = dict(median_seq_len=30, seq_len_sigma=0.8, min_seq_len=5, max_seq_len=150)
PRESETS = {"lifelong": lifelong_config, "short": short_config}


def preset_config(name, **overrides):
    """The `SimulatorConfig` of a named preset (`PRESETS`), with `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"Unknown simulator preset {name!r}; presets: {sorted(PRESETS)}. "
                         f"Received: name={name!r}")
    return PRESETS[name](**overrides)


def simulator_schema():
    """The default schema plus the ground-truth extras `truth_<task>`."""
    return schema_lib.FeatureSchema(extras=tuple(TRUTH_PREFIX + task for task in TASKS))


class Simulator:
    """Generates requests of a `SimulatorConfig`; `request(i)` depends only on seed and i.

    Example:
    >>> simulator = Simulator(SimulatorConfig(num_requests=10, max_seq_len=50))
    >>> request = simulator.request(0)   # dict of NumPy arrays keyed by schema name
    """

    def __init__(self, config=None):
        self.config = config or SimulatorConfig()
        self.schema = simulator_schema()
        self._build_world(np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(0,))))
        # truth="counts": how much the trait raises or lowers each topic's appeal (toys up,
        # nightlife down). A stream of its own, so the rest of the world stays as it was.
        self.topic_trait_appeal = np.concatenate([[0.0], np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(2,))).uniform(
                -1.0, 1.0, self.config.num_topics)])

    # --------------------------------------------------------------------------- world
    def _build_world(self, rng):
        c = self.config
        num_topics, num_categories = c.num_topics, c.num_categories
        self.topic_weight = 1.0 / np.arange(1, num_topics + 1) ** 0.5
        self.topic_weight /= self.topic_weight.sum()
        rng.shuffle(self.topic_weight)
        # Topics span one to three categories; the first has the largest share.
        spans = rng.choice([1, 2, 3], size=num_topics, p=[0.3, 0.45, 0.25])
        self.topic_categories = [1 + rng.choice(num_categories, size=k, replace=False)
                                 for k in spans]
        categories = 1 + rng.permutation(num_categories)
        self.signal_categories = np.sort(categories[:2])
        self.target_categories = np.sort(categories[2:4])

        # Index 0 of every per-item array is padding.
        num_items = c.num_items
        topic = np.concatenate([np.arange(num_topics),
                                rng.choice(num_topics, num_items - num_topics,
                                           p=self.topic_weight)])
        rng.shuffle(topic)
        category = np.empty(num_items, np.int64)
        for t in range(num_topics):
            members = np.flatnonzero(topic == t)
            cats = self.topic_categories[t]
            share = np.array([0.6] + [0.4 / (len(cats) - 1)] * (len(cats) - 1)) \
                if len(cats) > 1 else np.ones(1)
            category[members] = rng.choice(cats, size=len(members), p=share)
        author_topic = np.concatenate([np.arange(num_topics),
                                       rng.choice(num_topics, c.num_authors - num_topics,
                                                  p=self.topic_weight)])
        author = np.empty(num_items, np.int64)
        for t in range(num_topics):
            members = np.flatnonzero(topic == t)
            authors = 1 + np.flatnonzero(author_topic == t)
            # Skewed: a few authors of a topic publish most of its items.
            pick = np.floor(rng.random(len(members)) ** 2 * len(authors)).astype(np.int64)
            author[members] = authors[pick]
        popularity = 1.0 / rng.permutation(np.arange(1, num_items + 1)) ** 0.9

        def pad(values, fill=0):
            return np.concatenate([[fill], values])

        self.item_topic = pad(topic + 1)
        self.item_category = pad(category)
        self.item_author = pad(author)
        self.item_quality = pad(rng.normal(0.0, 0.5, num_items))
        self.item_longform = pad(rng.random(num_items))
        self.item_popularity = pad(popularity / popularity.sum(), 0.0)
        self.item_log_popularity = np.log(np.maximum(self.item_popularity * num_items, 1e-12))
        self.is_signal = np.isin(self.item_category, self.signal_categories)
        self.is_target = np.isin(self.item_category, self.target_categories)

        self._global_sampler = _Sampler(np.arange(1, num_items + 1), self.item_popularity[1:])
        signal_items = np.flatnonzero(self.is_signal)
        self._signal_sampler = _Sampler(signal_items, self.item_popularity[signal_items])
        self._topic_samplers = [
            _Sampler(items, self.item_popularity[items])
            for items in (np.flatnonzero(self.item_topic == t) for t in
                          range(1, num_topics + 1))]
        # signal_contrast: +1 on the first signal category (trait users), -1 on the second,
        # and no other event lands in them (exploring, interests, favourite authors).
        self.signal_sign = (np.where(self.item_category == self.signal_categories[0], 1.0, 0.0)
                            - (self.item_category == self.signal_categories[1]))
        self._signal_side_samplers = [
            _Sampler(items, self.item_popularity[items]) for items in
            (np.flatnonzero(self.item_category == category)
             for category in self.signal_categories)]
        self._explore_sampler, self._interest_samplers = (self._global_sampler,
                                                          self._topic_samplers)
        self._interest_topic_weight = self.topic_weight
        interest_item = np.ones(num_items + 1, bool)
        if c.signal_contrast:
            interest_item = ~self.is_signal
            unsignalled = np.flatnonzero(interest_item[1:]) + 1
            self._explore_sampler = _Sampler(unsignalled, self.item_popularity[unsignalled])
            self._interest_samplers = [
                _Sampler(items, self.item_popularity[items]) if len(items) else None
                for items in (np.flatnonzero((self.item_topic == t) & interest_item)
                              for t in range(1, num_topics + 1))]
            # A topic that lies wholly in the signal categories is never an interest.
            self._interest_topic_weight = self.topic_weight * [
                sampler is not None for sampler in self._interest_samplers]
            self._interest_topic_weight /= self._interest_topic_weight.sum()
        # Items grouped by author, and the authors of each topic (for favourite authors).
        author_items = np.flatnonzero(interest_item[1:]) + 1
        by_author = author_items[np.argsort(self.item_author[author_items], kind="stable")]
        self._author_items = by_author
        self._author_start = np.searchsorted(self.item_author[by_author],
                                             np.arange(c.num_authors + 2))
        self._topic_authors = [np.unique(self.item_author[author_items][
            self.item_topic[author_items] == t]) for t in range(1, num_topics + 1)]

    def world_summary(self):
        """Facts about the world for the metadata."""
        return {
            "signal_categories": self.signal_categories.tolist(),
            "target_categories": self.target_categories.tolist(),
            "topic_categories": [cats.tolist() for cats in self.topic_categories],
        }

    # ------------------------------------------------------------------------ requests
    def request(self, index):
        """Request `index` as a dict of NumPy arrays keyed by schema name (and extras)."""
        if not 0 <= index < self.config.num_requests:
            raise IndexError(f"request index must be in [0, {self.config.num_requests}). "
                             f"Received: index={index}")
        rng = np.random.default_rng(
            np.random.SeedSequence(self.config.seed, spawn_key=(1, int(index))))
        history = self._history(rng)
        candidates = self._candidates(rng, history)
        truth = self.action_probabilities(history["seq_item_id"], history["seq_action"],
                                          history["seq_time_delta"], candidates)
        recent = slice(-self.config.policy_history, None)
        policy_logits = self.action_logits(history["seq_item_id"][recent],
                                           history["seq_action"][recent],
                                           history["seq_time_delta"][recent],
                                           candidates)["click"]
        impression_probability = self.impression_probability(candidates, policy_logits, rng)
        impression = self.log_impressions(candidates, policy_logits, rng, samples=1)[0]
        request = {"user_id": np.int64(index + 1), **history,
                   "cand_item_id": candidates,
                   "cand_category_id": self.item_category[candidates],
                   "cand_author_id": self.item_author[candidates]}
        request.update(records.cross_counts(request, self.schema))
        request["impression"] = impression.astype(np.int64)
        request[TRUTH_PREFIX + "impression"] = impression_probability.astype(np.float32)
        for task in TASKS[1:]:
            acted = rng.random(len(candidates)) < truth[task]
            request[task] = (acted & impression).astype(np.int64)
            request[TRUTH_PREFIX + task] = (impression_probability * truth[task]).astype(
                np.float32)
        return request

    def _history(self, rng):
        c = self.config
        n = int(np.clip(round(rng.lognormal(math.log(c.resolved_median_seq_len),
                                            c.seq_len_sigma)), c.min_seq_len, c.max_seq_len))
        num_interests = int(rng.integers(2, 6))
        topics = 1 + rng.choice(c.num_topics, num_interests, replace=False,
                                p=self._interest_topic_weight)
        weights = rng.dirichlet(np.ones(num_interests))
        dormant = rng.random(num_interests) < c.dormant_probability
        dormant[np.argmax(weights)] = False
        start = np.where(dormant, rng.uniform(0.0, 0.3, num_interests),
                         rng.uniform(0.0, 0.6, num_interests))
        end = np.where(dormant, np.minimum(start + rng.uniform(0.15, 0.4, num_interests), 0.7),
                       np.inf)
        has_trait = rng.random() < c.trait_probability

        position = np.sort(rng.random(n) ** _EVENT_RECENCY_EXPONENT)
        active = (position[:, None] >= start) & (position[:, None] < end)
        interest_weight = np.cumsum(active * weights, axis=1)
        total_weight = interest_weight[:, -1]
        source = rng.random(n)
        explore = (source < c.explore_probability) | (total_weight <= 0)
        signal = ~explore & (source < c.explore_probability + c.signal_probability)
        if not c.signal_contrast:
            signal &= has_trait
        from_interest = ~explore & ~signal
        interest = np.minimum(
            (rng.random(n)[:, None] * total_weight[:, None] > interest_weight).sum(axis=1),
            num_interests - 1)

        items = np.empty(n, np.int64)
        items[explore] = self._explore_sampler.sample(rng, int(explore.sum()))
        signal_sampler = (self._signal_side_samplers[0 if has_trait else 1]
                          if c.signal_contrast else self._signal_sampler)
        items[signal] = signal_sampler.sample(rng, int(signal.sum()))
        event_topics = topics[interest[from_interest]]
        items[from_interest] = self._sample_in_topics(rng, event_topics,
                                                      self._interest_samplers)
        if c.favourite_author_probability > 0:
            self._favourite_author_events(rng, items, from_interest, interest, topics)
        if c.repeat_probability > 0:
            # In order, so that a repeat of a repeat is the item met first.
            earlier = np.floor(rng.random(n) * np.arange(n)).astype(np.int64)
            repeat = rng.random(n) < c.repeat_probability
            repeat[0] = False
            for i in np.flatnonzero(repeat):
                items[i] = items[earlier[i]]

        longform = self.item_longform[items]
        click = rng.random(n) < np.where(from_interest, 0.65, 0.3)
        long_view = rng.random(n) < np.where(from_interest, 0.15 + 0.4 * longform, 0.1)
        like = rng.random(n) < np.where(from_interest, 0.12, 0.02)
        action = (click * ACTION_BITS["click"] + long_view * ACTION_BITS["long_view"]
                  + like * ACTION_BITS["like"]).astype(np.int64)
        span = rng.uniform(30.0, c.history_days) * _DAY
        time_delta = (_REQUEST_TIME_GAP + np.floor((1.0 - position) * span)).astype(np.int64)
        return {"seq_item_id": items, "seq_category_id": self.item_category[items],
                "seq_author_id": self.item_author[items], "seq_action": action,
                "seq_time_delta": time_delta}

    def _favourite_author_events(self, rng, items, from_interest, interest, topics):
        """Moves a `favourite_author_probability` share of each interest's events onto one
        of the interest's favourite authors (an item of theirs, uniformly)."""
        favourite = from_interest & (rng.random(len(items))
                                     < self.config.favourite_author_probability)
        for i, topic in enumerate(topics):
            where = np.flatnonzero(favourite & (interest == i))
            authors = self._topic_authors[topic - 1]
            chosen = rng.choice(authors, min(_FAVOURITE_AUTHORS, len(authors)), replace=False)
            author = chosen[rng.integers(0, len(chosen), len(where))]
            start, stop = self._author_start[author], self._author_start[author + 1]
            items[where] = self._author_items[
                start + np.floor(rng.random(len(where)) * (stop - start)).astype(np.int64)]

    def _sample_in_topics(self, rng, topics, samplers=None):
        samplers = samplers or self._topic_samplers
        items = np.empty(len(topics), np.int64)
        for topic in np.unique(topics):
            where = np.flatnonzero(topics == topic)
            items[where] = samplers[topic - 1].sample(rng, len(where))
        return items

    def _candidates(self, rng, history):
        c = self.config
        m = int(rng.integers(c.resolved_min_candidates, c.max_candidates + 1))
        from_history = np.zeros(0, np.int64)
        if c.history_candidate_share > 0:
            seen = np.unique(history["seq_item_id"])
            from_history = rng.choice(seen, min(rng.binomial(m, c.history_candidate_share),
                                                len(seen)), replace=False)
        num_relevant, num_popular, num_random = rng.multinomial(m - len(from_history),
                                                                c.retrieval_mix)
        # Relevant retrieval: half by lifelong topic shares, half by recent (last 100) ones.
        history_topics = self.item_topic[history["seq_item_id"]]
        recent_topics = history_topics[-100:]
        picks = np.where(rng.random(num_relevant) < 0.5,
                         history_topics[rng.integers(0, len(history_topics), num_relevant)],
                         recent_topics[rng.integers(0, len(recent_topics), num_relevant)])
        pool = np.concatenate([
            from_history,
            self._sample_in_topics(rng, picks),
            self._global_sampler.sample(rng, num_popular),
            1 + rng.integers(0, c.num_items, num_random)])
        _, first = np.unique(pool, return_index=True)
        candidates = pool[np.sort(first)]
        if len(candidates) < m:  # duplicates removed: top up with distinct random items
            rest = np.setdiff1d(np.arange(1, c.num_items + 1), candidates)
            candidates = np.concatenate(
                [candidates, rng.choice(rest, m - len(candidates), replace=False)])
        return rng.permutation(candidates).astype(np.int64)

    # ---------------------------------------------------------------------- ground truth
    def action_logits(self, seq_item_id, seq_action, seq_time_delta, cand_item_id):
        """Ground-truth logits of p(action | impression) for each candidate, from a history.

        Engagement e of an event = (1 + bit weights) * (0.35 + 0.65 * 2^(-age/decay_days)),
        so old events keep a third of their weight. Trait = tanh(e in the signal categories
        / trait_scale); with `signal_contrast`, e in the first minus e in the second.

        `truth="shares"`: topic affinity = log(1 + T * share of e on the candidate's topic)
        (all categories); author affinity = log(1 + 40 * share on its author); the trait
        acts on target-category candidates only. Shares of the whole history, so a mean of
        the sequence carries them.

        `truth="counts"`: e summed over the events that match the candidate, on log scales:
        topic log(1 + e_topic / COUNTS_SCALES["topic"]), author and item likewise, weighted
        per task by COUNTS_WEIGHTS; the trait acts on every candidate, times its topic's
        appeal to the trait (uniform in [-1, 1]). Counts keep growing past any k events,
        and the author and item terms are matches among thousands of ids that a pooled
        vector blurs. Every term but the trait is a sum over the events that match the
        candidate, so a history cut down to those events (and the signal events) gives the
        candidate the same truth: the ceiling ladder's rungs are exact in that case.
        """
        seq_item_id = np.asarray(seq_item_id, np.int64)
        seq_action = np.asarray(seq_action, np.int64)
        valid = seq_item_id != 0
        age_days = np.asarray(seq_time_delta, np.float64) / _DAY
        engagement = ((1.0 + (seq_action & 1) + 1.5 * ((seq_action >> 1) & 1)
                       + 2.0 * ((seq_action >> 2) & 1))
                      * (0.35 + 0.65 * np.exp2(-age_days / self.config.decay_days)) * valid)
        if self.config.signal_contrast:
            evidence = (engagement * self.signal_sign[seq_item_id]).sum()
        else:
            evidence = engagement[self.is_signal[seq_item_id]].sum()
        trait = np.tanh(evidence / self.config.trait_scale)
        quality = self.item_quality[cand_item_id]
        longform = self.item_longform[cand_item_id]
        if self.config.truth == "counts":
            trait_effect = trait * self.topic_trait_appeal[self.item_topic[cand_item_id]]
            affinity = {
                key: np.log1p(_matched_sum(ids[seq_item_id], engagement, ids[cand_item_id])
                              / COUNTS_SCALES[key])
                for key, ids in (("topic", self.item_topic), ("author", self.item_author),
                                 ("item", np.arange(len(self.item_topic))))}
            return {task: (weights["bias"] + sum(weights[key] * affinity[key]
                                                 for key in affinity)
                           + weights["trait"] * trait_effect + weights["quality"] * quality
                           + weights["longform"] * longform)
                    for task, weights in COUNTS_WEIGHTS.items()}
        trait_effect = trait * self.is_target[cand_item_id]
        total = max(engagement.sum(), 1e-9)
        topic_share = np.bincount(self.item_topic[seq_item_id], engagement,
                                  minlength=self.config.num_topics + 1) / total
        author_share = np.bincount(self.item_author[seq_item_id], engagement,
                                   minlength=self.config.num_authors + 1) / total
        topic_affinity = np.log1p(self.config.num_topics * topic_share[
            self.item_topic[cand_item_id]])
        author_affinity = np.log1p(40.0 * author_share[self.item_author[cand_item_id]])
        return {
            "click": -3.2 + 1.1 * topic_affinity + 0.6 * author_affinity
                     + 2.0 * trait_effect + quality,
            "long_view": -3.6 + 0.9 * topic_affinity + 0.3 * author_affinity
                         + 1.5 * longform + 1.0 * trait_effect,
            "like": -4.5 + 0.6 * topic_affinity + 1.2 * author_affinity
                    + 0.8 * quality + 1.5 * trait_effect,
        }

    def action_probabilities(self, seq_item_id, seq_action, seq_time_delta, cand_item_id):
        """Ground-truth p(action | impression) per task, [m] each."""
        logits = self.action_logits(seq_item_id, seq_action, seq_time_delta, cand_item_id)
        return {task: 1.0 / (1.0 + np.exp(-logit)) for task, logit in logits.items()}

    def ceiling_ladder(self, request):
        """The ceiling ladder of one request: `{rung: {task: p(task|candidate) [m]}}` for the
        action tasks, one rung per entry of `LADDER_RUNGS` (k = `ladder_k`).

        Each rung is the ground truth itself (`action_probabilities`) recomputed from a
        restricted history, times the request's p(impression|candidate), which the logging
        policy fixed and which no rung changes. A rung whose history holds every event
        that matters to a candidate gives it its full-history truth.
        """
        k = self.config.ladder_k
        history = [np.asarray(request[name])
                   for name in ("seq_item_id", "seq_action", "seq_time_delta")]
        items, candidates = history[0], np.asarray(request["cand_item_id"])
        everything, newest = np.arange(len(items)), np.arange(len(items))[-k:]
        seq_category, seq_topic = self.item_category[items], self.item_topic[items]
        seq_author = self.item_author[items]

        seen_items, seen_authors = set(items.tolist()), set(seq_author.tolist())

        def topic_key(item):  # candidates of a topic met with neither item nor author share
            return (self.item_topic[item], item if item in seen_items else 0,
                    self.item_author[item] if self.item_author[item] in seen_authors else 0)

        def topic_top_k(key):
            topic, item, author = key
            events = np.flatnonzero(seq_topic == topic)
            relevance = 2 * (items[events] == item) + (seq_author[events] == author)
            best = np.lexsort((-events, -relevance))[:k]  # relevance, then the most recent
            return np.sort(events[best])

        selections = {  # rung: (the key that fixes a candidate's history, that history)
            "full": (lambda item: 0, lambda key: everything),
            "last_k": (lambda item: 0, lambda key: newest),
            "category_last_k": (lambda item: self.item_category[item],
                                lambda key: np.flatnonzero(seq_category == key)[-k:]),
            "topic_top_k": (topic_key, topic_top_k),
            "none": (lambda item: 0, lambda key: everything[:0]),
        }
        impression = np.asarray(request[TRUTH_PREFIX + "impression"], np.float64)
        ladder = {}
        for rung, (key_of, events_of) in selections.items():
            groups = {}
            for j, item in enumerate(candidates):
                groups.setdefault(key_of(item), []).append(j)
            rung_truth = {task: np.zeros(len(candidates)) for task in ACTION_BITS}
            for key, which in groups.items():
                events = events_of(key)
                probabilities = self.action_probabilities(
                    *(values[events] for values in history), candidates[which])
                for task in ACTION_BITS:
                    rung_truth[task][which] = impression[which] * probabilities[task]
            ladder[rung] = rung_truth
        return ladder

    def log_impressions(self, cand_item_id, policy_logits, rng, samples):
        """Runs the logging policy `samples` times: [samples, m] booleans.

        Score = policy logit + log popularity / 2 + Gumbel noise; candidates are taken in
        descending score, skipping those whose category already has `category_cap`
        impressions, until `impression_slots` are filled.
        """
        c = self.config
        m = len(cand_item_id)
        if m == 0:
            return np.zeros((samples, 0), bool)
        noise = rng.gumbel(0.0, c.policy_noise, (samples, m))
        score = (policy_logits + 0.5 * self.item_log_popularity[cand_item_id]) + noise
        order = np.argsort(-score, axis=1, kind="stable")
        _, category_index = np.unique(self.item_category[cand_item_id], return_inverse=True)
        ranked_category = category_index[order]
        one_hot = ranked_category[:, :, None] == np.arange(category_index.max() + 1)
        rank_in_category = np.take_along_axis(np.cumsum(one_hot, axis=1, dtype=np.int32),
                                              ranked_category[:, :, None], axis=2)[:, :, 0] - 1
        eligible = rank_in_category < c.category_cap
        chosen_ranked = eligible & (np.cumsum(eligible, axis=1) <= c.impression_slots)
        chosen = np.zeros((samples, m), bool)
        np.put_along_axis(chosen, order, chosen_ranked, axis=1)
        return chosen

    def impression_probability(self, cand_item_id, policy_logits, rng):
        """p(impression | candidate, the other candidates), by `truth_samples` policy runs."""
        return self.log_impressions(cand_item_id, policy_logits, rng,
                                    self.config.truth_samples).mean(axis=0)


def _matched_sum(keys, weights, queries):
    """For each query, the sum of `weights` over the positions whose key equals it."""
    values, inverse = np.unique(keys, return_inverse=True)
    if not len(values):
        return np.zeros(len(queries))
    sums = np.bincount(inverse, weights, minlength=len(values))
    position = np.minimum(np.searchsorted(values, queries), len(values) - 1)
    return np.where(values[position] == queries, sums[position], 0.0)


class _Sampler:
    """Draws items with probability proportional to weights (inverse CDF)."""

    def __init__(self, items, weights):
        self.items = np.asarray(items, np.int64)
        cdf = np.cumsum(np.asarray(weights, np.float64))
        self.cdf = cdf / cdf[-1]

    def sample(self, rng, size):
        index = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.items[np.minimum(index, len(self.items) - 1)]


def write_synthetic(output_dir, config=None, num_shards=4, compression="gzip", progress=None):
    """Generates `config.num_requests` requests into `output_dir`: splits `train` (the first
    requests) and `test` (the last `test_fraction`), sharded TFRecords, and `metadata.json`
    with the schema, id ranges, the config, row counts, label rates and the best achievable
    AUC per task (the ground truth scored against the sampled labels). Returns the metadata.

    `progress`, if given, is called as `progress(written, total)` after each request.
    """
    config = config or SimulatorConfig()
    simulator = Simulator(config)
    schema = simulator.schema
    num_test = config.num_test_requests
    splits = {"train": range(0, config.num_requests - num_test),
              "test": range(config.num_requests - num_test, config.num_requests)}
    metadata = {
        "source": "simulator",
        "schema": schema.to_dict(),
        "tasks": list(schema.tasks),
        "id_ranges": {"user_id": [1, config.num_requests], "item_id": [1, config.num_items],
                      "category_id": [1, config.num_categories],
                      "author_id": [1, config.num_authors]},
        "generator": {**config.to_dict(), **simulator.world_summary()},
        "splits": {}, "files": {},
    }
    audit = leak_audit.LeakAudit(schema.tasks, seed=config.seed)
    written = 0
    for split, indices in splits.items():
        if not len(indices):
            continue
        stats = _SplitStats(schema, config.ladder_k)
        with records.ShardedWriter(output_dir, split, min(num_shards, len(indices)),
                                   compression) as writer:
            for index in indices:
                request = simulator.request(index)
                stats.add(request, simulator.ceiling_ladder(request))
                (audit.add_test if split == "test" else audit.add_train)(request)
                writer.write(records.encode_example(request, schema))
                written += 1
                if progress is not None:
                    progress(written, config.num_requests)
        metadata["files"].update(writer.row_counts)
        metadata["splits"][split] = {
            "pattern": os.path.basename(records.split_pattern(output_dir, split, compression)),
            "num_requests": len(indices), **stats.summary()}
    metadata["leak_audit"] = audit.result()
    warning = leak_audit.set_size_warning(metadata["leak_audit"])
    if warning:
        _logger.warning("%s", warning)
    records.write_metadata(output_dir, metadata)
    return metadata


class _SplitStats:
    """Lengths, label rates, ground-truth AUC and ceiling ladder of one split."""

    def __init__(self, schema, ladder_k):
        self.schema, self.ladder_k = schema, ladder_k
        self.seq_lens, self.cand_lens = [], []
        self.labels = {task: [] for task in schema.tasks}
        self.truth = {task: [] for task in schema.tasks}
        self.ladder = {rung: {task: [] for task in ACTION_BITS} for rung in LADDER_RUNGS}

    def add(self, request, ladder):
        self.seq_lens.append(len(request["seq_item_id"]))
        self.cand_lens.append(len(request["cand_item_id"]))
        for task in self.schema.tasks:
            self.labels[task].append(request[task])
            self.truth[task].append(request[TRUTH_PREFIX + task])
        for rung, truth in ladder.items():
            for task, probabilities in truth.items():
                self.ladder[rung][task].append(probabilities)

    def summary(self):
        labels = {t: np.concatenate(v) for t, v in self.labels.items()}
        truth = {t: np.concatenate(v) for t, v in self.truth.items()}
        return {
            "mean_seq_len": float(np.mean(self.seq_lens)),
            "median_seq_len": float(np.median(self.seq_lens)),
            "max_seq_len": int(np.max(self.seq_lens)),
            "mean_candidates": float(np.mean(self.cand_lens)),
            "label_rate": {t: float(labels[t].mean()) for t in labels},
            "truth_auc": {t: auc(labels[t], truth[t]) for t in labels},
            "ceiling_ladder": {"k": self.ladder_k, "rungs": [
                {"name": rung, "history": LADDER_RUNGS[rung].format(k=self.ladder_k),
                 "truth_auc": {task: auc(labels[task], np.concatenate(values))
                               for task, values in by_task.items()}}
                for rung, by_task in self.ladder.items()]},
        }


def read_ceiling_ladder(metadata, split="test"):
    """The ceiling ladder of one split of simulated data, or None for data without one
    (a converted log).

    `metadata` is a data directory or its `read_metadata` dict. The ladder is
    `{"k": k, "rungs": [{"name", "history", "truth_auc": {task: AUC}}, ...]}`, rungs in the
    order of `LADDER_RUNGS`: the AUC that the ground truth reaches when recomputed from
    only the history that each family of models reads. It is a yardstick: a model that
    reads one rung's history should not beat that rung by much, a full-sequence model can.
    Not a strict bound, since a rung plugs its history into the truth as it is, and a
    model could also learn what the missing events say on average.
    """
    if isinstance(metadata, (str, os.PathLike)):
        metadata = records.read_metadata(os.fspath(metadata))
    splits = metadata.get("splits", {})
    if split not in splits:
        raise ValueError(f"No split {split!r} in the metadata; splits: {sorted(splits)}. "
                         f"Received: split={split!r}")
    return splits[split].get("ceiling_ladder")


def format_ceiling_ladder(ladder, tasks=None):
    """A Markdown table of a ladder from `read_ceiling_ladder`: one row per rung, one column
    per task (default: the action tasks), to print beside a results table."""
    tasks = list(tasks or ACTION_BITS)
    lines = ["| ceiling ladder: truth recomputed from | " + " | ".join(tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for rung in ladder["rungs"]:
        cells = [f"{rung['truth_auc'][t]:.4f}" if rung["truth_auc"].get(t) is not None
                 else "n/a" for t in tasks]
        lines.append(f"| {rung['history']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def auc(labels, scores):
    """ROC AUC with ties counted half (Mann-Whitney); None when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank within each group of tied scores.
    _, group_start, group_size = np.unique(sorted_scores, return_index=True,
                                           return_counts=True)
    average = group_start + (group_size + 1) / 2.0
    ranks[order] = np.repeat(average, group_size)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0)
                 / (positives * negatives))
