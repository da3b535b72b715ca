"""TF Serving's API messages for the gRPC client, without loading TensorFlow.

The messages are TF Serving's own generated modules (`tensorflow_serving.apis`); they import
TensorFlow's `TensorProto`, whose package `__init__` would load all of TensorFlow (seconds,
tens of seconds on a busy machine). `ifa_tf._deferred.imported_alone` holds that `__init__`
back while they import (about 0.2 s), and a process that imports TensorFlow later gets it
as usual, with these protos.

`make_tensor_proto` and `make_ndarray` convert NumPy arrays as `tf.make_tensor_proto` and
`tf.make_ndarray` do for the dtypes a ranking request or answer holds (numbers as
`tensor_content`, strings as `string_val`; answers also in the typed `*_val` fields, a single
value filling the shape), so that the client needs no TensorFlow op.
"""

import numpy as np

from ifa_tf import _deferred

with _deferred.imported_alone("tensorflow"):
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

__all__ = ["get_model_metadata_pb2", "get_model_status_pb2", "make_ndarray",
           "make_tensor_proto", "model_service_pb2_grpc", "predict_pb2",
           "prediction_service_pb2_grpc"]

# TensorFlow dtype -> (NumPy dtype, the TensorProto field that lists its values).
_NUMERIC = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT16: (np.int16, "int_val"),
    types_pb2.DT_INT8: (np.int8, "int_val"),
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_UINT16: (np.uint16, "int_val"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val"),
    types_pb2.DT_HALF: (np.float16, "half_val"),
}
_DTYPE_OF = {np.dtype(numpy_dtype): tf_dtype
             for tf_dtype, (numpy_dtype, _) in _NUMERIC.items()}


def make_tensor_proto(values):
    """A `TensorProto` of a NumPy array: numbers (their dtype kept) as little-endian
    `tensor_content`; str / bytes (an object or string array) as UTF-8 `string_val`."""
    array = np.asarray(values)
    proto = tensor_pb2.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype.kind in "USO":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(value.encode("utf-8") if isinstance(value, str) else
                                bytes(value) for value in array.reshape(-1).tolist())
        return proto
    if array.dtype not in _DTYPE_OF:
        raise ValueError(f"Cannot send dtype {array.dtype} in a TensorProto; ids are int64, "
                         f"scores float32. Received: dtype={array.dtype}")
    proto.dtype = _DTYPE_OF[array.dtype]
    proto.tensor_content = np.ascontiguousarray(
        array, array.dtype.newbyteorder("<")).tobytes()
    return proto


def make_ndarray(proto):
    """The NumPy array of a `TensorProto` (strings as an object array of bytes)."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    size = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == types_pb2.DT_STRING:
        values = list(proto.string_val)
        return _filled(np.array(values, dtype=object), size, object).reshape(shape)
    if proto.dtype not in _NUMERIC:
        name = types_pb2.DataType.Name(proto.dtype)
        raise ValueError(f"Cannot read a TensorProto of dtype {name}.")
    numpy_dtype, field = _NUMERIC[proto.dtype]
    numpy_dtype = np.dtype(numpy_dtype)
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, numpy_dtype.newbyteorder("<")).astype(
            numpy_dtype).reshape(shape)
    values = getattr(proto, field)
    if proto.dtype == types_pb2.DT_HALF:  # the float16 bits, as integers
        array = np.array(values, np.uint16).view(np.float16)
    else:
        array = np.array(values, numpy_dtype)
    return _filled(array, size, numpy_dtype).reshape(shape)


def _filled(array, size, dtype):
    """`array` stretched to `size` as TensorFlow reads a short value list: its last value
    repeated (none: zeros)."""
    if len(array) == size:
        return array
    if len(array) == 0:
        return np.zeros(size, dtype) if dtype is not object else np.full(size, b"", object)
    if len(array) > size:
        raise ValueError(f"A TensorProto lists {len(array)} values for {size} elements.")
    return np.concatenate([array, np.repeat(array[-1:], size - len(array))])
