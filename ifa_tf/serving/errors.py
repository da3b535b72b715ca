"""Status codes and messages shared by the server and the client.

The server raises `ServingError` with TF Serving's status code and (where TF Serving has one)
its message text; gRPC returns it as the call's status and REST as `{"error": message}` with
the HTTP status TF Serving's HTTP server uses for that code. The client raises the same class.
"""

import grpc

# TF Serving's http_server.cc mapping of canonical codes to HTTP statuses.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# The reverse, for REST clients. 400 is ambiguous (INVALID_ARGUMENT, FAILED_PRECONDITION,
# OUT_OF_RANGE); INVALID_ARGUMENT is by far the most common.
_CODE_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_CODE_FOR_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# Messages quote what the client sent (a model name, input names); a longer one is cut, so an
# error is never larger than the request's point (a 100 KB model name echoed back, or 20,000
# input names, would come back RESOURCE_EXHAUSTED from the client's own receive limit).
MAX_MESSAGE_CHARS = 2000


class ServingError(Exception):
    """A failed serving call: `code` is a `grpc.StatusCode`, `message` the server's text.

    `http_status` is set when the error came over REST.
    """

    def __init__(self, code, message, http_status=None):
        message = clip(message)
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


def clip(text, limit=MAX_MESSAGE_CHARS):
    """`text`, cut to `limit` characters with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def http_status(code):
    """HTTP status TF Serving's REST API answers for a canonical code."""
    return _HTTP_STATUS.get(code, 500)


def code_for_http_status(status):
    return _CODE_FOR_HTTP.get(status, grpc.StatusCode.INTERNAL if status >= 500
                              else grpc.StatusCode.UNKNOWN)


def code_for_value(value):
    """`grpc.StatusCode` of a canonical code number (e.g. `tf.errors.OpError.error_code`)."""
    return _CODE_FOR_VALUE.get(value, grpc.StatusCode.UNKNOWN)


# Message texts of TF Serving (server_core.cc, predict_util.cc, get_model_status_impl.cc).
def servable_not_found(name, version=None):
    request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    return ServingError(grpc.StatusCode.NOT_FOUND,
                        f"Servable not found for request: {request}")


def unknown_version_label(label):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"Unrecognized servable version label: {label}")


def signature_not_found(signature_name):
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                        f'Serving signature key "{signature_name}" not found.')


def invalid_argument(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)
