"""Client for an exported ranking model behind TF Serving or `ifa-serve` (gRPC or REST).

Only TF Serving's public API is used, so the same code talks to either server:

    client = GrpcClient("localhost:8500", "ifa")          # or RestClient("localhost:8501", "ifa")
    rankings = client.rank(features)                      # features: {name: np.ndarray [B, ...]}
    rankings[0].item_ids, rankings[0].scores["click"]     # valid candidates, best first

Every failure raises `ServingError` carrying the server's status code and message; a call
that runs past its deadline raises it with `DEADLINE_EXCEEDED`.
"""

import dataclasses
import json
import socket
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from ifa_tf.export import RANKED_INDICES, RANKED_ITEM_IDS, SIGNATURE_NAME
from ifa_tf.serving.errors import ServingError, code_for_http_status

_RANKING_OUTPUTS = (RANKED_INDICES, RANKED_ITEM_IDS)


@dataclasses.dataclass
class Ranking:
    """One user's ranked candidate list (padding removed).

    Attributes:
        item_ids: int64 [k], valid candidate ids by descending score.
        indices: int64 [k], their positions in the request's candidate set.
        scores: `{output: float32 [k]}`, every task probability and `score`, in that order.
        version: the model version that answered (gRPC; over REST only when pinned, as
            TF Serving's REST responses do not name it).
    """

    item_ids: np.ndarray
    indices: np.ndarray
    scores: dict
    version: int


def rankings_from_outputs(outputs, version):
    """Splits a batched predict result into one `Ranking` per user."""
    indices, item_ids = outputs[RANKED_INDICES], outputs[RANKED_ITEM_IDS]
    score_names = [name for name in outputs if name not in _RANKING_OUTPUTS]
    rankings = []
    for row in range(indices.shape[0]):
        valid = item_ids[row] != 0
        order = indices[row][valid]
        rankings.append(Ranking(
            item_ids=item_ids[row][valid], indices=order,
            scores={name: outputs[name][row][order] for name in score_names},
            version=version))
    return rankings


class ServingClient:
    """Shared logic of the gRPC and REST clients.

    Args:
        target: `host:port` of the server's gRPC (GrpcClient) or REST (RestClient) port.
        model_name: the served model's name.
        signature_name: defaults to `serving_default`.
        version, version_label: pin a version (at most one); default: the latest.
        timeout: default deadline of a call, seconds.
    """

    def __init__(self, target, model_name, signature_name=SIGNATURE_NAME, version=None,
                 version_label=None, timeout=10.0):
        if version is not None and version_label is not None:
            raise ValueError("Pass at most one of version and version_label. Received: "
                             f"version={version!r}, version_label={version_label!r}")
        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = version
        self.version_label = version_label
        self.timeout = timeout

    def predict(self, features, output_filter=(), timeout=None):
        """Raw outputs: `({output: np.ndarray}, version)`."""
        raise NotImplementedError

    def rank(self, features, timeout=None):
        """Batched features (user features [B], others [B, n] / [B, m]) -> B `Ranking`s."""
        outputs, version = self.predict(_as_int64(features), timeout=timeout)
        return rankings_from_outputs(outputs, version)

    def rank_user(self, features, timeout=None):
        """One user's features (user features scalars, others 1-D) -> a `Ranking`."""
        batched = {name: np.asarray(value)[np.newaxis] for name, value in features.items()}
        return self.rank(batched, timeout=timeout)[0]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class GrpcClient(ServingClient):
    """Talks to `PredictionService` / `ModelService` over gRPC.

    `max_message_bytes` bounds requests and responses (gRPC's own default receive limit,
    4 MiB, is too small for large candidate sets; see serving/README.md for sizing).
    """

    def __init__(self, target, model_name, max_message_bytes=256 * 1024 * 1024, **kwargs):
        super().__init__(target, model_name, **kwargs)
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.prediction_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _fill_model_spec(self, model_spec, signature=True):
        model_spec.name = self.model_name
        if signature:
            model_spec.signature_name = self.signature_name
        if self.version is not None:
            model_spec.version.value = self.version
        elif self.version_label is not None:
            model_spec.version_label = self.version_label

    def predict(self, features, output_filter=(), timeout=None):
        request = predict_pb2.PredictRequest()
        self._fill_model_spec(request.model_spec)
        for name, value in features.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        request.output_filter.extend(output_filter)
        response = self._call(self.prediction_stub.Predict, request, timeout)
        outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def model_status(self, timeout=None):
        """`[(version, state name, error message)]` of the model's versions."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._fill_model_spec(request.model_spec, signature=False)
        response = self._call(self.model_stub.GetModelStatus, request, timeout)
        states = get_model_status_pb2.ModelVersionStatus.State
        return [(s.version, states.Name(s.state), s.status.error_message)
                for s in response.model_version_status]

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise ServingError(error.code(), error.details()) from error

    def close(self):
        self.channel.close()


class RestClient(ServingClient):
    """Talks to the REST API (`/v1/models/...`) with the columnar `inputs` format."""

    def _model_url(self):
        url = f"http://{self.target}/v1/models/{self.model_name}"
        if self.version is not None:
            url += f"/versions/{self.version}"
        elif self.version_label is not None:
            url += f"/labels/{self.version_label}"
        return url

    def predict(self, features, output_filter=(), timeout=None):
        body = {"signature_name": self.signature_name,
                "inputs": {name: np.asarray(value).tolist() for name, value in features.items()}}
        result = self._request(self._model_url() + ":predict", body, timeout)
        outputs = result["outputs"]
        if not isinstance(outputs, dict):  # TF Serving unwraps a single output
            raise ServingError(grpc.StatusCode.INTERNAL,
                               "Expected named outputs from a multi-output signature")
        arrays = {name: np.asarray(value, dtype=np.int64 if name in _RANKING_OUTPUTS
                                   else np.float32) for name, value in outputs.items()}
        if output_filter:
            arrays = {name: arrays[name] for name in output_filter}
        return arrays, self.version  # REST responses do not name the version that answered

    def model_status(self, timeout=None):
        result = self._request(self._model_url(), None, timeout)
        return [(int(s["version"]), s["state"], s.get("status", {}).get("error_message", ""))
                for s in result["model_version_status"]]

    def _request(self, url, body, timeout):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(
                    request, timeout=self.timeout if timeout is None else timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                message = json.loads(payload)["error"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode(errors="replace")
            raise ServingError(code_for_http_status(error.code), message,
                               http_status=error.code) from error
        except (socket.timeout, TimeoutError) as error:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"No answer from {url} within the deadline") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"No answer from {url} within the deadline") from error
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               f"Cannot reach {url}: {error.reason}") from error


def connect(target, model_name, protocol="grpc", **kwargs):
    """A `GrpcClient` or `RestClient` for `target`."""
    clients = {"grpc": GrpcClient, "rest": RestClient}
    if protocol not in clients:
        raise ValueError(f"protocol must be one of {sorted(clients)}. Received: "
                         f"protocol={protocol!r}")
    return clients[protocol](target, model_name, **kwargs)


def _as_int64(features):
    """Ids as int64 arrays; a float or ragged feature is refused before it is sent."""
    converted = {}
    for name, value in features.items():
        array = np.asarray(value)
        if array.dtype.kind not in "iu":
            raise ValueError(f"Feature {name!r} must hold integer ids. "
                             f"Received: dtype={array.dtype}")
        converted[name] = array.astype(np.int64, copy=False)
    return converted
