"""Prometheus metrics of `ifa-serve`, named and bucketed as TF Serving exports them.

With `--monitoring_config_file` (TF Serving's format, `prometheus_config { enable: true
path: "..." }`) the REST port answers the path with:

- `:tensorflow:serving:request_count{model_name, status}`: Predict calls by status code;
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`: histogram of their wall
  time in microseconds (buckets 10 * 1.8^i, i < 33, as TF Serving's).

`prometheus_client` holds the values (a `Counter` and a `Histogram`) and writes the text
format, label values escaped. Two things keep TF Serving's names, which dashboards and alerts
query: `prometheus_client` writes a counter's samples as `<name>_total`, and TF Serving's
count has no such suffix, so the count is exposed under its own name as an untyped family
(`# TYPE ... untyped`; `rate()` and every query by name work as before); and a bucket's `le`
is written as TF Serving writes it (six significant digits: `le="10"`, not `le="10.0"`).

A request names its model, and a client may name anything: calls naming a model the server
does not serve are counted under the one label value `UNKNOWN_MODEL`, so no request adds a
series. The series are then bounded by the served models times the status codes.
"""

import re

import prometheus_client
from prometheus_client.core import Metric

DEFAULT_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
BUCKETS = tuple(10 * 1.8 ** i for i in range(33))
# The `model_name` of calls naming a model that is not served.
UNKNOWN_MODEL = "__unknown__"


def read_monitoring_config(path):
    """The metrics path a TF Serving monitoring config enables, or None when disabled."""
    with open(path) as f:
        text = f.read()
    block = re.search(r"prometheus_config\s*:?\s*\{([^}]*)\}", text)
    if block is None:
        raise ValueError(f"{path}: expected a prometheus_config {{ ... }} block")
    body = block.group(1)
    enable = re.search(r"\benable\s*:\s*(\w+)", body)
    if enable is None or enable.group(1) not in ("true", "false"):
        raise ValueError(f"{path}: prometheus_config needs `enable: true` or `enable: false`")
    if enable.group(1) == "false":
        return None
    path_match = re.search(r'\bpath\s*:\s*"([^"]*)"', body)
    return path_match.group(1) if path_match else DEFAULT_PATH


class Metrics:
    """Request counts and latency histograms (thread-safe, as `prometheus_client` is).

    `known_models`: the names of the served models; calls naming any other are recorded as
    `UNKNOWN_MODEL`. None records every name as given (for callers that checked it).
    """

    def __init__(self, known_models=None):
        self.known_models = None if known_models is None else frozenset(known_models)
        values = prometheus_client.CollectorRegistry()
        self._count = prometheus_client.Counter(
            REQUEST_COUNT, "The number of Predict requests, by model and status code.",
            ["model_name", "status"], registry=values)
        self._latency = prometheus_client.Histogram(
            REQUEST_LATENCY, "Wall time of Predict requests in microseconds.",
            ["model_name", "API", "entrypoint"], buckets=BUCKETS, registry=values)
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(_TFServingNames(self._count, self._latency))

    def record(self, model_name, api, entrypoint, status, seconds):
        if self.known_models is not None and model_name not in self.known_models:
            model_name = UNKNOWN_MODEL
        self._count.labels(model_name, status).inc()
        self._latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)

    def render(self):
        """The Prometheus text exposition (format 0.0.4) of every series."""
        return prometheus_client.generate_latest(self.registry).decode()


class _TFServingNames:
    """A collector presenting a `Counter` and a `Histogram` under TF Serving's exposition:
    the count's samples without `_total`, `le` in six significant digits, no `_created`."""

    def __init__(self, count, latency):
        self._count = count
        self._latency = latency

    def collect(self):
        [count] = self._count.collect()
        family = Metric(REQUEST_COUNT, count.documentation, "unknown")
        for sample in count.samples:
            if sample.name == REQUEST_COUNT + "_total":
                family.add_sample(REQUEST_COUNT, sample.labels, sample.value)
        [latency] = self._latency.collect()
        histogram = Metric(REQUEST_LATENCY, latency.documentation, "histogram")
        for sample in latency.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            if "le" in labels and labels["le"] != "+Inf":
                labels = dict(labels, le=f"{float(labels['le']):.6g}")
            histogram.add_sample(sample.name, labels, sample.value)
        return [family, histogram]
