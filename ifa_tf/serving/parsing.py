"""Bounded parsing of request bodies, shared by `ifa-serve`'s gRPC and REST transports.

Parsing costs many times a body's size before any check on its content can run (JSON lists
nested 100 deep took 49.8x over REST, a tensor_shape of empty dims 34.0x over gRPC, before
these checks; benchmarks/results/serving_memory). So what a body may make the parser build
is refused from the bytes, before the parse:

- `ByteBudget`: the bytes of request bodies being received, parsed or answered at once, over
  both transports together (`--max_bytes_in_flight`). Concurrent bodies no longer add up:
  4 gRPC bodies of 16 MB took +1.8 GB side by side before this cap.
- `check_json_depth`: how deep a REST body's arrays and objects nest (`--rest_max_json_depth`).
- `parse_predict_request`: how many dims each gRPC input's `tensor_shape` declares
  (`--max_input_dims`), read from the message's bytes without building the dims.

A limit of 0 turns its check off. Each refusal is TF Serving's error status with a message
naming the limit's flag.
"""

import contextlib
import re
import threading

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow_serving.apis import predict_pb2

from ifa_tf.serving import errors


class ByteBudget:
    """Bytes of request bodies held at once, under `limit` (0: no limit). Thread-safe: the
    gRPC worker threads and the REST event loop share one."""

    def __init__(self, limit=0):
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, size):
        """Takes `size` bytes, or raises UNAVAILABLE (REST 503) when they would pass the
        limit: the client may retry once other bodies are answered."""
        with self._lock:
            if self.limit and self.in_use + size > self.limit:
                in_use = self.in_use
            else:
                self.in_use += size
                return
        raise errors.ServingError(
            grpc.StatusCode.UNAVAILABLE,
            f"Server busy: a request body of {size} bytes would pass this server's limit on "
            f"bytes being parsed at once, --max_bytes_in_flight={self.limit} ({in_use} in "
            "use); retry later")

    def release(self, size):
        with self._lock:
            self.in_use -= size

    @contextlib.contextmanager
    def reserved(self, size):
        self.reserve(size)
        try:
            yield
        finally:
            self.release(size)


# ------------------------------------------------------------------------------------ JSON
# A JSON string, escapes included (unrolled so that long strings do not backtrack).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_CHUNK = 1 << 20


def json_depth(body, most=0):
    """How deep `body`'s arrays and objects nest (0 for a scalar), read from its brackets
    outside strings without parsing it. With `most`, stops counting once it is passed.

    Exact for valid JSON; for malformed JSON, exact up to the first error, which the parser
    then refuses. Takes at most two copies of the body and 4 MB besides."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    deepest = depth = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets, np.uint8, min(_DEPTH_CHUNK, len(brackets) - start),
                              start)
        # '[' and '{' end in the bits 11, ']' and '}' in 01: +1 and -1.
        levels = np.cumsum((chunk & 2).astype(np.int32) - 1) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if most and deepest > most:
            break
    return deepest


def check_json_depth(body, max_depth):
    """Refuses (INVALID_ARGUMENT) a JSON body nested deeper than `max_depth` (0: no limit),
    before it is parsed."""
    if max_depth and json_depth(body, max_depth) > max_depth:
        raise errors.invalid_argument(
            f"JSON Parse error: the request body nests arrays and objects more than "
            f"{max_depth} deep, this server's limit --rest_max_json_depth={max_depth}")


# ------------------------------------------------------------------------------------ gRPC
def _shape_skeleton():
    """A message class that reads a PredictRequest's bytes as its inputs' names and encoded
    tensor_shapes only: the map `inputs` (field 2) as repeated entries, each `TensorProto`
    (field 2 of an entry) reduced to its `tensor_shape` (field 2) kept as bytes. Every other
    field is left unparsed."""
    proto = descriptor_pb2.FileDescriptorProto(name="ifa_tf/serving/shape_skeleton.proto",
                                               package="ifa_tf.shape_skeleton",
                                               syntax="proto3")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    field_type = descriptor_pb2.FieldDescriptorProto
    tensor = proto.message_type.add(name="Tensor")
    tensor.field.add(name="tensor_shape", number=2, label=optional, type=field_type.TYPE_BYTES)
    entry = proto.message_type.add(name="Input")
    entry.field.add(name="key", number=1, label=optional, type=field_type.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=field_type.TYPE_MESSAGE,
                    type_name=".ifa_tf.shape_skeleton.Tensor")
    request = proto.message_type.add(name="Request")
    request.field.add(name="inputs", number=2, label=descriptor_pb2.FieldDescriptorProto
                      .LABEL_REPEATED, type=field_type.TYPE_MESSAGE,
                      type_name=".ifa_tf.shape_skeleton.Input")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("ifa_tf.shape_skeleton.Request"))


_ShapeSkeleton = _shape_skeleton()
# The most bytes one dim of a tensor_shape may take on the wire: a Dim of any int64 size
# (13 bytes) and a name of up to 51 bytes. A shape longer than max_input_dims such dims is
# refused unparsed; a shorter one is parsed (a dim takes at least 2 bytes, so at most
# 32 * max_input_dims of them) and its dims counted.
DIM_BYTES = 64


def parse_predict_request(data, max_input_dims=0):
    """A `PredictRequest` from its bytes, each input's tensor_shape first checked to declare
    at most `max_input_dims` dims (0: no limit) without building them (INVALID_ARGUMENT
    naming the input and the flag). Bytes that are no PredictRequest are INTERNAL, as gRPC
    answers a message it cannot parse."""
    try:
        if max_input_dims:
            for item in _ShapeSkeleton.FromString(data).inputs:
                _check_dims(item.key, item.value.tensor_shape, max_input_dims)
        return predict_pb2.PredictRequest.FromString(data)
    except message.DecodeError as error:
        raise errors.ServingError(grpc.StatusCode.INTERNAL,
                                  f"Could not parse the PredictRequest: {error}") from error


def _check_dims(key, shape_bytes, max_input_dims):
    refusal = (f"Input {errors.clip(key, 64)}: tensor_shape declares more than "
               f"{max_input_dims} dims, this server's limit --max_input_dims={max_input_dims}")
    if len(shape_bytes) > max_input_dims * DIM_BYTES:
        raise errors.invalid_argument(
            f"{refusal} ({len(shape_bytes)} bytes, over the {DIM_BYTES} a dim may take)")
    dims = len(tensor_shape_pb2.TensorShapeProto.FromString(shape_bytes).dim)
    if dims > max_input_dims:
        raise errors.invalid_argument(f"{refusal} ({dims} dims)")
