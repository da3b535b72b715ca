"""`ServerOptions`: what the `ifa-serve` flags set, checked without TensorFlow (so that a
bad flag answers before it loads)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What the `ifa-serve` flags set; names follow `tensorflow_model_server`'s flags."""

    port: int = 8500
    rest_api_port: int = 0  # 0: no REST API, as in TF Serving
    host: str = "127.0.0.1"
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    file_system_poll_wait_seconds: float = 1.0
    grpc_max_threads: int = 16
    # Parsing a body takes many times its size before the checks on its content can run (up
    # to 19.1x over gRPC and 47.7x over REST, benchmarks/results/serving_memory), so this
    # bounds the memory of any one request.
    max_request_bytes: int = 64 * 1024 * 1024
    # Every user costs a fixed amount besides its m and n (IFA on CPU: 26.2 KB in those
    # results; 200,000 users of m = n = 1 took 3.76 GB in issue 24), so B is bounded alone too.
    max_batch_size: int = 1000
    max_candidates: int = 100_000
    max_sequence_length: int = 100_000
    # B·m and B·n: what a request at every bound costs is measured by
    # benchmarks/serving_memory.py (serving/README.md, "Limits").
    max_total_candidates: int = 200_000
    max_total_sequence_length: int = 1_000_000
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000  # the longest wait between retries
    # Bounded parsing (ifa_tf/serving/parsing.py): what a body may make the parser build,
    # refused from its bytes before it is parsed. The memory each bounds is measured by
    # benchmarks/serving_memory.py (serving/README.md, "Limits").
    # One body at --max_request_bytes at a time, gRPC and REST together.
    max_bytes_in_flight: int = 64 * 1024 * 1024
    max_input_dims: int = 8  # dims of one gRPC input's tensor_shape (TensorFlow allows 254)
    rest_max_json_depth: int = 16  # a rank-2 input in the row format nests 4 deep
    rest_api_num_threads: int = 0  # 0: 4 per CPU, as TF Serving's
    rest_read_timeout_seconds: float = 60.0
    rest_request_timeout_seconds: float = 60.0  # a request's line, headers and body, whole
    rest_max_connections: int = 64
    rest_max_header_bytes: int = 64 * 1024
    shutdown_grace_seconds: float = 30.0
    monitoring_config_file: str = ""

    def __post_init__(self):
        if bool(self.model_base_path) == bool(self.model_config_file):
            raise ValueError("Set exactly one of --model_base_path and --model_config_file. "
                             f"Received: model_base_path={self.model_base_path!r}, "
                             f"model_config_file={self.model_config_file!r}")
        for field in ("port", "rest_api_port"):
            value = getattr(self, field)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{field} must be in [0, 65535]. Received: {field}={value}")
        for field in ("grpc_max_threads", "max_request_bytes", "rest_max_connections",
                      "max_bytes_in_flight"):
            if getattr(self, field) < 1:
                raise ValueError(f"--{field} must be positive. "
                                 f"Received: {field}={getattr(self, field)}")
        for field in ("max_batch_size", "max_candidates", "max_sequence_length",
                      "max_total_candidates", "max_total_sequence_length",
                      "file_system_poll_wait_seconds", "max_num_load_retries",
                      "load_retry_interval_micros", "max_input_dims", "rest_max_json_depth",
                      "rest_max_header_bytes", "rest_api_num_threads"):
            if getattr(self, field) < 0:
                raise ValueError(f"--{field} must be >= 0. "
                                 f"Received: {field}={getattr(self, field)}")
        for field in ("rest_read_timeout_seconds", "rest_request_timeout_seconds"):
            if not getattr(self, field) > 0:
                raise ValueError(f"--{field} must be > 0. Received: "
                                 f"{field}={getattr(self, field)}")
        if self.max_bytes_in_flight < self.max_request_bytes:
            raise ValueError(
                "--max_bytes_in_flight must be at least --max_request_bytes, or a request of "
                "that size could never be served. Received: "
                f"max_bytes_in_flight={self.max_bytes_in_flight}, "
                f"max_request_bytes={self.max_request_bytes}")

    def model_configs(self):
        from ifa_tf.serving.model_manager import ModelConfig, read_model_config_file

        if self.model_config_file:
            return read_model_config_file(self.model_config_file)
        return [ModelConfig(self.model_name, self.model_base_path)]

    def limits(self):
        from ifa_tf.serving.model_manager import Limits

        return Limits(self.max_batch_size, self.max_candidates, self.max_sequence_length,
                      self.max_total_candidates, self.max_total_sequence_length)
