"""`ifa-serve`: a TF-Serving-compatible model server (gRPC + REST) for machines without the
`tensorflow_model_server` binary. See `serving/README.md` for what it shares with TF Serving
and where it differs."""

import concurrent.futures
import logging

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc

from ifa_tf.serving import grpc_service, http_server, parsing
from ifa_tf.serving import metrics as metrics_lib
from ifa_tf.serving.model_manager import ModelManager
from ifa_tf.serving.options import ServerOptions

__all__ = ["ModelServer", "ServerOptions"]

_LOG = logging.getLogger("ifa_serve")


class ModelServer:
    """Loads the models, then serves gRPC on `port` and REST on `rest_api_port` (if set).

    `start()` returns once the versions on disk are loaded and the ports listen;
    `stop()` refuses new calls, lets in-flight ones finish (up to the grace period), and
    stops polling.
    """

    def __init__(self, options):
        self.options = options
        self.manager = ModelManager(options.model_configs(),
                                    options.file_system_poll_wait_seconds,
                                    options.max_num_load_retries, options.limits(),
                                    options.load_retry_interval_micros / 1e6)
        self.grpc_port = None
        self.rest_port = None
        self._grpc_server = None
        self._rest_server = None
        # The bytes being parsed at once, over gRPC and REST together.
        self.budget = parsing.ByteBudget(options.max_bytes_in_flight)
        self.metrics = metrics_lib.Metrics(known_models=self.manager.configs)
        self.metrics_path = (metrics_lib.read_monitoring_config(options.monitoring_config_file)
                             if options.monitoring_config_file else None)

    def start(self):
        options = self.options
        self.manager.start()
        message_options = [("grpc.max_receive_message_length", options.max_request_bytes),
                           ("grpc.max_send_message_length", -1)]
        self._grpc_server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads,
                                                  thread_name_prefix="ifa-serve-grpc"),
            options=message_options)
        grpc_service.add_prediction_service(
            grpc_service.PredictionServicer(self.manager, self.metrics, self.budget,
                                            options.max_input_dims), self._grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            grpc_service.ModelServicer(self.manager), self._grpc_server)
        self.grpc_port = self._grpc_server.add_insecure_port(f"{options.host}:{options.port}")
        if not self.grpc_port:
            raise OSError(f"Cannot listen on {options.host}:{options.port}")
        self._grpc_server.start()
        _LOG.info("Running gRPC ModelServer at %s:%d ...", options.host, self.grpc_port)
        if options.rest_api_port:
            self._rest_server = http_server.RestServer(
                self.manager, options.host, options.rest_api_port, self.budget,
                options.max_request_bytes, self.metrics, self.metrics_path,
                options.rest_max_json_depth, options.rest_api_num_threads,
                http_server.TransportLimits(
                    options.rest_max_connections, options.rest_max_header_bytes,
                    options.rest_read_timeout_seconds, options.rest_request_timeout_seconds))
            self.rest_port = self._rest_server.start().port
            _LOG.info("Exporting HTTP/REST API at:%s:%d ...", options.host, self.rest_port)
        return self

    def stop(self):
        _LOG.info("Shutting down: refusing new requests, finishing in-flight ones")
        grace = self.options.shutdown_grace_seconds
        if self._rest_server is not None:
            self._rest_server.begin_stop(grace)  # stops accepting connections
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
        if self._rest_server is not None:
            self._rest_server.stop(grace)
        self.manager.stop()
        _LOG.info("Server stopped")
