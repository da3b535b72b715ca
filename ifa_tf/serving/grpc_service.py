"""TF Serving's gRPC services over a `ModelManager`: PredictionService and ModelService.

Predict takes its request as bytes (`add_prediction_service`): its bytes are reserved in the
server's `ByteBudget` and its shapes' dims counted before it is parsed
(`ifa_tf.serving.parsing`).
"""

import logging
import time

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, inference_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from ifa_tf.serving import errors, parsing
from ifa_tf.serving.model_manager import tensor_proto_spec, to_ndarray

_LOG = logging.getLogger("ifa_serve")
SIGNATURE_DEF_FIELD = "signature_def"


def model_spec_request(model_spec):
    """`(name, version or None, label or None)` of a request's `ModelSpec`."""
    if not model_spec.name:
        raise errors.invalid_argument("Missing ModelSpec")
    choice = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if choice == "version" else None
    label = model_spec.version_label if choice == "version_label" else None
    return model_spec.name, version, label


def predict(manager, request, context=None):
    """Answers a `PredictRequest` (raises `ServingError`).

    The inputs' declared shapes pass the limits before any of them is materialised. With
    `context`, the gRPC call, a call that has ended (deadline passed, or cancelled) by the time
    the model would start is answered DEADLINE_EXCEEDED or CANCELLED without running it: the
    model is one TensorFlow call that cannot be stopped once started. (gRPC itself drops a
    call that ends while it waits for a worker thread.)
    """
    name, version, label = model_spec_request(request.model_spec)
    servable = manager.resolve(name, version, label)
    signature = servable.signature(request.model_spec.signature_name)
    declared = {key: tensor_proto_spec(proto, key) for key, proto in request.inputs.items()}
    signature.check_inputs(declared, manager.limits)
    inputs = {key: to_ndarray(proto, key) for key, proto in request.inputs.items()}
    if context is not None:
        _check_call_active(context)
    outputs = signature.run(inputs, request.output_filter, manager.limits)
    response = predict_pb2.PredictResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature.name
    for alias, value in outputs.items():
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
    return response


def get_model_metadata(manager, request):
    name, version, label = model_spec_request(request.model_spec)
    if not request.metadata_field:
        raise errors.invalid_argument(
            "GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF_FIELD:
            raise errors.invalid_argument(f"Metadata field {field} is not supported")
    servable = manager.resolve(name, version, label)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = servable.version
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def get_model_status(manager, request):
    name, version, label = model_spec_request(request.model_spec)
    if label:
        version = manager.version_for_label(name, label)
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state, message in manager.status(name, version):
        status = response.model_version_status.add()
        status.version = number
        status.state = state
        status.status.error_code = grpc.StatusCode.UNKNOWN.value[0] if message else 0
        status.status.error_message = message
    return response


def _check_call_active(context):
    """Raises DEADLINE_EXCEEDED or CANCELLED once the gRPC call has ended."""
    if context.time_remaining() <= 0:
        raise errors.ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    if not context.is_active():
        raise errors.ServingError(grpc.StatusCode.CANCELLED, "Cancelled")


def _unary(method, api=None, bounded=False):
    """Turns `ServingError` into the call's status, anything else into INTERNAL; counts and
    times the calls of `api` in the servicer's metrics. `bounded`: the request comes as bytes,
    reserved in the servicer's budget while it is parsed and answered, and `method` also
    takes the call's context."""

    def handler(self, request, context):
        began = time.perf_counter()
        status = grpc.StatusCode.OK
        model_name = ""
        try:
            if not bounded:
                model_name = request.model_spec.name
                return method(self.manager, request)
            with self.budget.reserved(len(request)):
                request = parsing.parse_predict_request(request, self.max_input_dims)
                model_name = request.model_spec.name
                return method(self.manager, request, context)
        except errors.ServingError as error:
            status = error.code
            context.abort(error.code, error.message)
        except Exception as error:  # never leak a stack trace as an UNKNOWN status
            status = grpc.StatusCode.INTERNAL
            _LOG.exception("Unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            if api is not None and self.metrics is not None:
                self.metrics.record(model_name, api, "GRPC", status.name,
                                    time.perf_counter() - began)

    handler.__name__ = method.__name__
    return handler


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`Predict` and `GetModelMetadata`; Classify, Regress, MultiInference are UNIMPLEMENTED
    (the exported signatures are predict signatures). Register it with
    `add_prediction_service`, which hands `Predict` its request's bytes.

    `budget`: the server's `ByteBudget` (None: no limit); `max_input_dims`: the most dims an
    input's tensor_shape may declare (0: no limit).
    """

    def __init__(self, manager, metrics=None, budget=None, max_input_dims=0):
        self.manager = manager
        self.metrics = metrics
        self.budget = budget if budget is not None else parsing.ByteBudget()
        self.max_input_dims = max_input_dims

    Predict = _unary(predict, api="Predict", bounded=True)
    GetModelMetadata = _unary(get_model_metadata)


def add_prediction_service(servicer, server):
    """Registers `servicer` as TF Serving's PredictionService (what the generated
    `add_PredictionServiceServicer_to_server` does), but its Predict takes the request
    undeserialized, as bytes, so that they are bounded before they are parsed."""
    def method(behaviour, request=None, response=None):
        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=request and request.FromString,
            response_serializer=response.SerializeToString)

    handlers = {
        "Predict": method(servicer.Predict, None, predict_pb2.PredictResponse),
        "GetModelMetadata": method(servicer.GetModelMetadata,
                                   get_model_metadata_pb2.GetModelMetadataRequest,
                                   get_model_metadata_pb2.GetModelMetadataResponse),
        "Classify": method(servicer.Classify, classification_pb2.ClassificationRequest,
                           classification_pb2.ClassificationResponse),
        "Regress": method(servicer.Regress, regression_pb2.RegressionRequest,
                          regression_pb2.RegressionResponse),
        "MultiInference": method(servicer.MultiInference, inference_pb2.MultiInferenceRequest,
                                 inference_pb2.MultiInferenceResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService", handlers),))


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`GetModelStatus`; `HandleReloadConfigRequest` is UNIMPLEMENTED."""

    def __init__(self, manager):
        self.manager = manager
        self.metrics = None

    GetModelStatus = _unary(get_model_status)
