"""Serving: a client for TF Serving / `ifa-serve`, and `ifa-serve` itself.

Client (features in, ranked list out, against either server):
    `GrpcClient`, `RestClient`, `connect`, `Ranking`, `ServingError`.
Requests from raw log rows, as `ifa-data from-log` builds them: `RequestBuilder`,
    `pad_requests`.
Server (`ifa-serve`): `ifa_tf.serving.server.ModelServer` and `ServerOptions`.

The names load on first use, so that `ifa-serve` checks its flags before TensorFlow loads.
"""

from ifa_tf._lazy import lazy_names

_WHERE = {
    "GrpcClient": "client",
    "Ranking": "client",
    "RestClient": "client",
    "ServingClient": "client",
    "connect": "client",
    "ServingError": "errors",
    "RequestBuilder": "request_builder",
    "pad_requests": "request_builder",
}

__getattr__, __all__ = lazy_names(__name__, _WHERE)
