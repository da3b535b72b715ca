"""Client for an exported ranking model behind TF Serving or `ifa-serve` (gRPC or REST).

Only TF Serving's public API is used, so the same code talks to either server:

    client = GrpcClient("localhost:8500", "ifa")          # or RestClient("localhost:8501", "ifa")
    rankings = client.rank(features)                      # features: {name: np.ndarray [B, ...]}
    rankings[0].item_ids, rankings[0].scores["click"]     # valid candidates, best first

Features holding raw string ids (what `ifa-data from-log` read in the log: user, items,
categories) go to the `serving_raw` signature, and each `Ranking` then carries the ranked
candidates' raw ids too (`raw_item_ids`).

Every failure raises `ServingError` carrying the server's status code and message; a call
that runs past its deadline raises it with `DEADLINE_EXCEEDED`.

The clients load no TensorFlow: REST needs only the standard library and NumPy, gRPC TF
Serving's generated messages (`ifa_tf.serving.protos`). A process that imports nothing else
answers in well under a second (`benchmarks/results/client_start/`).
"""

import dataclasses
import json
import socket
import urllib.error
import urllib.request

import grpc
import numpy as np

from ifa_tf.serving.closeable import Closeable
from ifa_tf.serving.errors import ServingError, code_for_http_status
from ifa_tf.signatures import (RANKED_INDICES, RANKED_ITEM_IDS, RANKED_RAW_ITEM_IDS,
                               RAW_SIGNATURE_NAME, SIGNATURE_NAME, STATE_MODEL, STATE_TIME)

_RANKING_OUTPUTS = (RANKED_INDICES, RANKED_ITEM_IDS, RANKED_RAW_ITEM_IDS)
# int64 outputs (REST answers them as JSON numbers): the ranking and a state's time and model.
_ID_OUTPUTS = (RANKED_INDICES, RANKED_ITEM_IDS, STATE_TIME, STATE_MODEL)


@dataclasses.dataclass
class Ranking:
    """One user's ranked candidate list (padding removed).

    Attributes:
        item_ids: int64 [k], valid candidate ids by descending score.
        indices: int64 [k], their positions in the request's candidate set.
        scores: `{output: float32 [k]}`, every task probability and `score`, in that order.
        version: the model version that answered (gRPC; over REST only when pinned, as
            TF Serving's REST responses do not name it).
        raw_item_ids: the raw ids (str) of `item_ids`, when the request sent raw ids
            (`serving_raw`); None otherwise.
    """

    item_ids: np.ndarray
    indices: np.ndarray
    scores: dict
    version: int
    raw_item_ids: list = None


def rankings_from_outputs(outputs, version):
    """Splits a batched predict result into one `Ranking` per user."""
    indices, item_ids = outputs[RANKED_INDICES], outputs[RANKED_ITEM_IDS]
    raw_ids = outputs.get(RANKED_RAW_ITEM_IDS)
    score_names = [name for name in outputs if name not in _RANKING_OUTPUTS]
    rankings = []
    for row in range(indices.shape[0]):
        valid = item_ids[row] != 0
        order = indices[row][valid]
        rankings.append(Ranking(
            item_ids=item_ids[row][valid], indices=order,
            scores={name: outputs[name][row][order] for name in score_names},
            version=version,
            raw_item_ids=None if raw_ids is None else [_text(v) for v in raw_ids[row][valid]]))
    return rankings


class ServingClient(Closeable):
    """Shared logic of the gRPC and REST clients.

    Args:
        target: `host:port` of the server's gRPC (GrpcClient) or REST (RestClient) port.
        model_name: the served model's name.
        signature_name: defaults to `serving_default`, and to `serving_raw` for features
            with raw string ids.
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

    def predict(self, features, output_filter=(), timeout=None, signature_name=None):
        """Raw outputs: `({output: np.ndarray}, version)`; `signature_name` defaults to the
        client's."""
        raise NotImplementedError

    def rank(self, features, timeout=None):
        """Batched features (user features [B], others [B, n] / [B, m]) -> B `Ranking`s.

        Ids are int64, or raw strings (any id feature a string: then every id feature,
        `user_*`, `seq_*_id` and `cand_*_id`, is sent as text, to `serving_raw` unless the
        client names another signature)."""
        features, raw = request_features(features)
        signature_name = self.signature_name
        if raw and signature_name == SIGNATURE_NAME:
            signature_name = RAW_SIGNATURE_NAME
        outputs, version = self.predict(features, timeout=timeout,
                                        signature_name=signature_name)
        return rankings_from_outputs(outputs, version)

    def rank_user(self, features, timeout=None):
        """One user's features (user features scalars, others 1-D) -> a `Ranking`."""
        batched = {name: np.asarray(value)[np.newaxis] for name, value in features.items()}
        return self.rank(batched, timeout=timeout)[0]

    def signature_inputs(self, signature_name=None, timeout=None):
        """The input names of a served signature (default: the client's), as the server
        lists them in GetModelMetadata: what a request to it must send."""
        signature_name = signature_name or self.signature_name
        signatures = self.signature_defs(timeout)
        if signature_name not in signatures:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{signature_name}" not found. The '
                               f"model serves {sorted(signatures)}.")
        return signatures[signature_name]

    def signature_defs(self, timeout=None):
        """`{signature name: [input names]}` of the served version (GetModelMetadata)."""
        raise NotImplementedError


class GrpcClient(ServingClient):
    """Talks to `PredictionService` / `ModelService` over gRPC.

    `max_message_bytes` bounds requests and responses (gRPC's own default receive limit,
    4 MiB, is too small for large candidate sets; see serving/README.md for sizing).
    """

    def __init__(self, target, model_name, max_message_bytes=256 * 1024 * 1024, **kwargs):
        super().__init__(target, model_name, **kwargs)
        from ifa_tf.serving import protos

        self.protos = protos
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.prediction_stub = protos.prediction_service_pb2_grpc.PredictionServiceStub(
            self.channel)
        self.model_stub = protos.model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _fill_model_spec(self, model_spec, signature=True):
        model_spec.name = self.model_name
        if signature:
            model_spec.signature_name = self.signature_name
        if self.version is not None:
            model_spec.version.value = self.version
        elif self.version_label is not None:
            model_spec.version_label = self.version_label

    def predict(self, features, output_filter=(), timeout=None, signature_name=None):
        protos = self.protos
        request = protos.predict_pb2.PredictRequest()
        self._fill_model_spec(request.model_spec)
        if signature_name is not None:
            request.model_spec.signature_name = signature_name
        for name, value in features.items():
            request.inputs[name].CopyFrom(protos.make_tensor_proto(np.asarray(value)))
        request.output_filter.extend(output_filter)
        response = self._call(self.prediction_stub.Predict, request, timeout)
        outputs = {name: protos.make_ndarray(proto) for name, proto in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def model_status(self, timeout=None):
        """`[(version, state name, error message)]` of the model's versions."""
        status_pb2 = self.protos.get_model_status_pb2
        request = status_pb2.GetModelStatusRequest()
        self._fill_model_spec(request.model_spec, signature=False)
        response = self._call(self.model_stub.GetModelStatus, request, timeout)
        states = status_pb2.ModelVersionStatus.State
        return [(s.version, states.Name(s.state), s.status.error_message)
                for s in response.model_version_status]

    def signature_defs(self, timeout=None):
        metadata_pb2 = self.protos.get_model_metadata_pb2
        request = metadata_pb2.GetModelMetadataRequest()
        self._fill_model_spec(request.model_spec, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self.prediction_stub.GetModelMetadata, request, timeout)
        signature_map = metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {name: sorted(signature.inputs)
                for name, signature in signature_map.signature_def.items()}

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

    def predict(self, features, output_filter=(), timeout=None, signature_name=None):
        body = {"signature_name": signature_name or self.signature_name,
                "inputs": {name: _json_column(value) for name, value in features.items()}}
        result = self._request(self._model_url() + ":predict", body, timeout)
        outputs = result["outputs"]
        if not isinstance(outputs, dict):  # TF Serving unwraps a single output
            raise ServingError(grpc.StatusCode.INTERNAL,
                               "Expected named outputs from a multi-output signature")
        arrays = {name: np.asarray(value, dtype=np.int64 if name in _ID_OUTPUTS else
                                   object if name == RANKED_RAW_ITEM_IDS else np.float32)
                  for name, value in outputs.items()}
        if output_filter:
            arrays = {name: arrays[name] for name in output_filter}
        return arrays, self.version  # REST responses do not name the version that answered

    def model_status(self, timeout=None):
        result = self._request(self._model_url(), None, timeout)
        return [(int(s["version"]), s["state"], s.get("status", {}).get("error_message", ""))
                for s in result["model_version_status"]]

    def signature_defs(self, timeout=None):
        result = self._request(self._model_url() + "/metadata", None, timeout)
        signature_map = result["metadata"]["signature_def"].get("signature_def", {})
        return {name: sorted(signature.get("inputs", {}))
                for name, signature in signature_map.items()}

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


def is_id_feature(name):
    """Features that hold ids by the schema's naming rule: `user_*`, `seq_*_id`, `cand_*_id`
    (not the cross counts)."""
    return name.startswith("user_") or (name.endswith("_id") and name.startswith(
        ("seq_", "cand_")) and not name.startswith("cand_cross_"))


def request_features(features):
    """`(features ready to send, raw)`: with every id an int64, int64 arrays; when an id
    feature holds text (str or bytes), raw: id features as object arrays of str (integers
    written as text), the others int64. A float, ragged or mixed feature is refused before
    it is sent."""
    arrays = {name: np.asarray(value) for name, value in features.items()}
    raw = any(array.dtype.kind in "USO" and is_id_feature(name)
              for name, array in arrays.items())
    converted = {}
    for name, array in arrays.items():
        if raw and is_id_feature(name):
            converted[name] = _text_array(name, array)
            continue
        if array.dtype.kind not in "iu":
            raise ValueError(f"Feature {name!r} must hold integer "
                             f"{'ids' if is_id_feature(name) else 'values'}"
                             f"{' or raw string ids' if is_id_feature(name) else ''}. "
                             f"Received: dtype={array.dtype}")
        converted[name] = array.astype(np.int64, copy=False)
    return converted, raw


def _text_array(name, array):
    if array.dtype.kind in "iu":
        return np.vectorize(lambda v: "" if v == 0 else str(v), otypes=[object])(array)
    if array.dtype.kind not in "USO":
        raise ValueError(f"Feature {name!r} must hold raw string ids (or integers). "
                         f"Received: dtype={array.dtype}")
    converted = np.empty(array.shape, dtype=object)
    for index, value in np.ndenumerate(array):
        if not isinstance(value, (str, bytes)):
            raise ValueError(f"Feature {name!r} must hold raw string ids. Received: "
                             f"{value!r} ({type(value).__name__}) at {list(index)}")
        converted[index] = _text(value)
    return converted


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _json_column(array):
    return array.tolist()
