"""Serving: a client for TF Serving / `ifa-serve`, and `ifa-serve` itself.

Client (features in, ranked list out, against either server):
    `GrpcClient`, `RestClient`, `connect`, `Ranking`, `ServingError`.
Server (`ifa-serve`): `ifa_tf.serving.server.ModelServer` and `ServerOptions`.
"""

from ifa_tf.serving.client import GrpcClient, Ranking, RestClient, ServingClient, connect
from ifa_tf.serving.errors import ServingError

__all__ = ["GrpcClient", "Ranking", "RestClient", "ServingClient", "ServingError", "connect"]
