"""Prometheus metrics of `ifa-serve`, named and bucketed as TF Serving exports them.

With `--monitoring_config_file` (TF Serving's format, `prometheus_config { enable: true
path: "..." }`) the REST port answers the path with:

- `:tensorflow:serving:request_count{model_name, status}`: Predict calls by status code;
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`: histogram of their wall
  time in microseconds (buckets 10 * 1.8^i, i < 33, as TF Serving's).

A request names its model, and a client may name anything: calls naming a model the server
does not serve are counted under the one label value `UNKNOWN_MODEL`, so no request adds a
series, and every label value is escaped as the text format requires (backslash, double
quote, line feed), so no value can forge a line. The series are then bounded by the served
models times the status codes.
"""

import re
import threading

DEFAULT_PATH = "/monitoring/prometheus/metrics"
_BUCKETS = tuple(10 * 1.8 ** i for i in range(33))
# The `model_name` of calls naming a model that is not served.
UNKNOWN_MODEL = "__unknown__"
_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def escape_label_value(value):
    """`value` as the Prometheus text format writes a label value: backslash, double quote
    and line feed escaped."""
    return str(value).translate(_LABEL_ESCAPES)


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
    """Thread-safe request counters and latency histograms.

    `known_models`: the names of the served models; calls naming any other are recorded as
    `UNKNOWN_MODEL`. None records every name as given (for callers that checked it).
    """

    def __init__(self, known_models=None):
        self.known_models = None if known_models is None else frozenset(known_models)
        self._lock = threading.Lock()
        self._counts = {}  # (model_name, status) -> count
        self._latency = {}  # (model_name, api, entrypoint) -> [bucket counts, sum, count]

    def record(self, model_name, api, entrypoint, status, seconds):
        microseconds = seconds * 1e6
        if self.known_models is not None and model_name not in self.known_models:
            model_name = UNKNOWN_MODEL
        with self._lock:
            key = (model_name, status)
            self._counts[key] = self._counts.get(key, 0) + 1
            series = self._latency.setdefault((model_name, api, entrypoint),
                                              [[0] * len(_BUCKETS), 0.0, 0])
            for index, bound in enumerate(_BUCKETS):
                if microseconds <= bound:
                    series[0][index] += 1
            series[1] += microseconds
            series[2] += 1

    def render(self):
        """The Prometheus text exposition of every series."""
        lines = ["# TYPE :tensorflow:serving:request_count counter"]
        with self._lock:
            for (model, status), count in sorted(self._counts.items()):
                lines.append(f':tensorflow:serving:request_count{{model_name='
                             f'"{escape_label_value(model)}",'
                             f'status="{escape_label_value(status)}"}} {count}')
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api, entrypoint), (buckets, total, count) in sorted(
                    self._latency.items()):
                labels = (f'model_name="{escape_label_value(model)}",'
                          f'API="{escape_label_value(api)}",'
                          f'entrypoint="{escape_label_value(entrypoint)}"')
                for bound, bucket_count in zip(_BUCKETS, buckets):
                    lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},'
                                 f'le="{bound:.6g}"}} {bucket_count}')
                lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},'
                             f'le="+Inf"}} {count}')
                lines.append(f":tensorflow:serving:request_latency_sum{{{labels}}} {total}")
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {count}")
        return "\n".join(lines) + "\n"
