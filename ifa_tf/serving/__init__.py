"""Serving: a client for TF Serving / `ifa-serve`, and `ifa-serve` itself.

Client (features in, ranked list out, against either server):
    `GrpcClient`, `RestClient`, `connect`, `Ranking`, `ServingError`.
Requests from raw log rows, as `ifa-data from-log` builds them: `RequestBuilder`,
    `pad_requests`.
Server (`ifa-serve`): `ifa_tf.serving.server.ModelServer` and `ServerOptions`.
"""

from ifa_tf.serving.client import GrpcClient, Ranking, RestClient, ServingClient, connect
from ifa_tf.serving.errors import ServingError
from ifa_tf.serving.request_builder import RequestBuilder, pad_requests

__all__ = ["GrpcClient", "Ranking", "RequestBuilder", "RestClient", "ServingClient",
           "ServingError", "connect", "pad_requests"]
