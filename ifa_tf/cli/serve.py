"""`ifa-serve`: serve exported SavedModels over TF Serving's gRPC and REST APIs.

    ifa-serve --model_name=ifa --model_base_path=/models/ifa --port=8500 --rest_api_port=8501

Flags shared with `tensorflow_model_server` keep its names and defaults; `--host` (loopback
by default) and the `--max_*` request limits are ifa-serve's own. SIGTERM or SIGINT stops the
server after in-flight requests finish.
"""

import os
import signal
import threading

from absl import app, flags, logging

from ifa_tf.cli import run_app
from ifa_tf.serving.options import ServerOptions

_DEFAULTS = ServerOptions.__dataclass_fields__


def define_flags(flag_values=flags.FLAGS):
    """Defines ifa-serve's flags (at run time, so other console scripts may reuse names)."""
    f = flag_values
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port, logged at start).",
                         flag_values=f)
    flags.DEFINE_integer("rest_api_port", 0, "REST API port; 0 disables the REST API.",
                         flag_values=f)
    flags.DEFINE_string("host", "127.0.0.1",
                        "Address to listen on. Loopback by default; 0.0.0.0 for every interface.",
                        flag_values=f)
    flags.DEFINE_string("model_name", "default",
                        "Name of the model served from --model_base_path.", flag_values=f)
    flags.DEFINE_string("model_base_path", "",
                        "Directory whose all-digit subdirectories are versions.", flag_values=f)
    flags.DEFINE_string("model_config_file", "",
                        "TF Serving models.config (text ModelServerConfig); replaces --model_name "
                        "and --model_base_path.", flag_values=f)
    flags.DEFINE_float("file_system_poll_wait_seconds", 1.0,
                       "Seconds between polls of the base paths for new versions; 0 polls once.",
                       flag_values=f)
    flags.DEFINE_integer("grpc_max_threads", 16, "Threads answering gRPC calls concurrently.",
                         flag_values=f)
    flags.DEFINE_integer("max_request_bytes", 64 * 1024 * 1024,
                         "Largest gRPC message / REST body accepted (RESOURCE_EXHAUSTED beyond).",
                         flag_values=f)
    flags.DEFINE_integer("max_batch_size", 1000, "Most users B per request; 0: no limit.",
                         flag_values=f)
    flags.DEFINE_integer("max_candidates", 100_000, "Most candidates m per request; 0: no limit.",
                         flag_values=f)
    flags.DEFINE_integer("max_sequence_length", 100_000,
                         "Longest behaviour sequence n per request; 0: no limit.", flag_values=f)
    flags.DEFINE_integer("max_total_candidates", 200_000,
                         "Most candidates B·m over all users of a request (a user without "
                         "candidates counts as one); 0: no limit.", flag_values=f)
    flags.DEFINE_integer("max_total_sequence_length", 1_000_000,
                         "Most sequence events B·n over all users of a request (a user without "
                         "events counts as one); 0: no limit.", flag_values=f)
    flags.DEFINE_integer("max_num_load_retries", 5,
                         "Retries of a version that fails to load; then it waits until its "
                         "directory changes.", flag_values=f)
    flags.DEFINE_integer("load_retry_interval_micros", 60_000_000,
                         "Longest wait between retries of a failed load; the first retry "
                         "waits one poll, and the wait doubles from there.", flag_values=f)
    flags.DEFINE_integer("max_bytes_in_flight", 64 * 1024 * 1024,
                         "Most bytes of request bodies (REST) and messages (gRPC) being "
                         "received, parsed or answered at once, both protocols together; a "
                         "request that would pass it is refused UNAVAILABLE (REST 503) before "
                         "it is parsed. At least --max_request_bytes.", flag_values=f)
    # Its name until the cap covered gRPC too.
    flags.DEFINE_alias("rest_max_body_bytes_in_flight", "max_bytes_in_flight", flag_values=f)
    flags.DEFINE_integer("max_input_dims", 8,
                         "Most dims one gRPC input's tensor_shape may declare, checked before "
                         "the message is parsed; 0: no limit.", flag_values=f)
    flags.DEFINE_integer("rest_max_json_depth", 16,
                         "Deepest nesting of arrays and objects in a REST body, checked before "
                         "it is parsed; 0: no limit.", flag_values=f)
    flags.DEFINE_integer("rest_api_num_threads", 0,
                         "Threads parsing and answering REST requests; 0: 4 per CPU.",
                         flag_values=f)
    flags.DEFINE_float("rest_read_timeout_seconds", 60.0,
                       "A REST connection that sends nothing for this long, idle between "
                       "requests or stalled inside one (408), is closed.", flag_values=f)
    flags.DEFINE_float("rest_request_timeout_seconds", 60.0,
                       "A REST request whose line, headers and body have not all arrived this "
                       "long after its first byte is answered 408 and its connection closed.",
                       flag_values=f)
    flags.DEFINE_integer("rest_max_connections", 64,
                         "Most REST connections open at once; one more is answered 503 and "
                         "closed.", flag_values=f)
    flags.DEFINE_integer("rest_max_header_bytes", 64 * 1024,
                         "Most bytes of a REST request's line and headers (431 beyond); 0: no "
                         "limit.", flag_values=f)
    flags.DEFINE_string("monitoring_config_file", "",
                        "TF Serving monitoring config; with prometheus_config enabled, the REST "
                        "port serves Prometheus metrics at its path.", flag_values=f)
    flags.DEFINE_float("shutdown_grace_seconds", 30.0,
                       "How long SIGTERM waits for in-flight requests.", flag_values=f)
    flags.DEFINE_integer("tensorflow_intra_op_parallelism", 0,
                         "Threads inside one op; 0: TensorFlow's default.", flag_values=f)
    flags.DEFINE_integer("tensorflow_inter_op_parallelism", 0,
                         "Ops run concurrently; 0: TensorFlow's default.", flag_values=f)


FLAGS = flags.FLAGS


def options_from_flags():
    return ServerOptions(**{name: getattr(FLAGS, name) for name in _DEFAULTS})


def serve(options, stop_event):
    """Runs a server until `stop_event` is set; the function the CLI and tests share."""
    from ifa_tf.serving.server import ModelServer

    server = ModelServer(options).start()
    stop_event.wait()
    server.stop()


def check(argv):
    """What `main` checks before TensorFlow loads: the arguments and every option's value."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        options = options_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    for name in ("model_config_file", "monitoring_config_file"):
        path = getattr(options, name)
        if path and not os.path.isfile(path):
            raise app.UsageError(f"--{name}={path} does not exist.")


def main(argv):
    check(argv)
    import tensorflow as tf

    if FLAGS.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(
            FLAGS.tensorflow_intra_op_parallelism)
    if FLAGS.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(
            FLAGS.tensorflow_inter_op_parallelism)
    try:
        options = options_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    stop_event = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop_event.set())
    logging.info("ifa-serve starting: %s", options)
    serve(options, stop_event)


def run():
    define_flags()
    # A server's log is its output: info lines (loads, requests refused) by default.
    run_app(main, __name__, "ifa-serve", default_verbosity=0, check=check)


if __name__ == "__main__":
    run()
