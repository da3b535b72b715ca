"""Prometheus metrics of `ifa-serve`, named and bucketed as TF Serving exports them.

With `--monitoring_config_file` (TF Serving's format, `prometheus_config { enable: true
path: "..." }`) the REST port answers the path with:

- `:tensorflow:serving:request_count{model_name, status}`: Predict calls by status code;
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`: histogram of their wall
  time in microseconds (buckets 10 * 1.8^i, i < 33, as TF Serving's).
"""

import re
import threading

DEFAULT_PATH = "/monitoring/prometheus/metrics"
_BUCKETS = tuple(10 * 1.8 ** i for i in range(33))


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
    """Thread-safe request counters and latency histograms."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {}  # (model_name, status) -> count
        self._latency = {}  # (model_name, api, entrypoint) -> [bucket counts, sum, count]

    def record(self, model_name, api, entrypoint, status, seconds):
        microseconds = seconds * 1e6
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
                lines.append(f':tensorflow:serving:request_count{{model_name="{model}",'
                             f'status="{status}"}} {count}')
            lines.append("# TYPE :tensorflow:serving:request_latency histogram")
            for (model, api, entrypoint), (buckets, total, count) in sorted(
                    self._latency.items()):
                labels = f'model_name="{model}",API="{api}",entrypoint="{entrypoint}"'
                for bound, bucket_count in zip(_BUCKETS, buckets):
                    lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},'
                                 f'le="{bound:.6g}"}} {bucket_count}')
                lines.append(f':tensorflow:serving:request_latency_bucket{{{labels},'
                             f'le="+Inf"}} {count}')
                lines.append(f":tensorflow:serving:request_latency_sum{{{labels}}} {total}")
                lines.append(f":tensorflow:serving:request_latency_count{{{labels}}} {count}")
        return "\n".join(lines) + "\n"
