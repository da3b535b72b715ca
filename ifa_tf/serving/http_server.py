"""`ifa-serve`'s REST transport: uvicorn serving `rest.RestApp`, on an event loop in its own
thread.

Why uvicorn: it is the most used ASGI server, maintained, and its httptools protocol parses
HTTP/1.1 with llhttp (Node.js's parser), so framing (Content-Length, chunked bodies, malformed
requests), keep-alive, pipelining and graceful shutdown are a widely used library's, and one
event loop holds thousands of connections where `http.server` held a thread each. Its
protocol class is a setting (`Config(http=...)`), which is where the limits it lacks go, and
the API is a plain ASGI app (`rest.RestApp`). hypercorn parses with h11, in Python; aiohttp
(llhttp too) is a client and server framework whose request handler would need the same
additions; granian runs its workers in processes of their own, apart from the models this
process holds.

uvicorn leaves a few things to its user, which `_Protocol` adds, each a method over uvicorn's
`HttpToolsProtocol` (`uvicorn` and `httptools` are pinned in setup.cfg for this):

- at most `max_connections` connections; one more is answered 503 at once and closed;
- at most `max_header_bytes` of request line and headers (431), counted as they arrive;
- a request whose line, headers and body have not all arrived `request_timeout` seconds after
  its first byte is answered 408, however steadily it trickles;
- a connection that sends nothing for `read_timeout` seconds is closed: idle (uvicorn's
  keep-alive timeout, armed here from the connection's start too), or stalled inside a
  request (408);
- every error is TF Serving's JSON `{"error": ...}`, also for a request the parser refuses
  (400 naming llhttp's reason), where uvicorn answers plain text;
- shutdown waits for requests that have arrived whole, not for a client stalled mid-request.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import socket
import threading
import time

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ifa_tf.serving import errors, parsing, rest

_LOG = logging.getLogger("ifa_serve")


@dataclasses.dataclass(frozen=True)
class TransportLimits:
    """What one REST connection may hold; 0 or None turns a limit off."""

    max_connections: int = 0
    max_header_bytes: int = 0
    read_timeout: float = 60.0
    request_timeout: float = None


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer `status`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with `ifa-serve`'s connection limits (see the module).

    A request is "receiving" from its first byte (llhttp's message begin) until its body
    has arrived (message complete); only then is it work that shutdown waits for.
    """

    limits = TransportLimits()  # set per server by `RestServer`

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refused = False  # over the connection cap: never served
        self._closing = False  # answered by the transport; what arrives now is dropped
        self._receiving = False
        self._in_head = False
        self._head_received = 0  # bytes received while the head was incomplete
        self._head_parsed = 0  # bytes of the request line and header lines parsed
        self._deadline = None  # the request timeout's timer
        self._stall = None  # the read timeout's timer while a request is receiving
        self._abort = None  # the last resort of a close whose answer is not taken

    # ------------------------------------------------------------------------ connection
    def connection_made(self, transport):
        limit = self.limits.max_connections
        if limit and len(self.connections) >= limit:
            self._refused = True
            transport.write(_response(503, f"Server busy: {limit} connections are open, this "
                                           "server's limit --rest_max_connections; retry later"))
            transport.close()
            return
        super().connection_made(transport)
        # Headers and body go out in two writes; under Nagle's algorithm the second waits for
        # the client's delayed ACK (40 ms on Linux). asyncio sets TCP_NODELAY only on sockets
        # it made itself.
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                                      1)
        # uvicorn arms its keep-alive timeout only after a response: a connection that
        # never sends a byte would be held forever.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def connection_lost(self, exc):
        if self._refused:
            return
        for timer in (self._deadline, self._stall, self._abort):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data):
        if self._closing:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__  # a limit of ours, or what uvicorn's callback refused
            if isinstance(cause, _Refusal):
                self._answer_and_close(cause.status, cause.message)
            else:  # e.g. a request target that is not ASCII
                self._answer_and_close(400, f"Malformed request: {cause or error}")
            return
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrade is served: the request is answered as plain HTTP
        except httptools.HttpParserError as error:
            self._answer_and_close(400, f"Malformed request: {error}")
            return
        if self._in_head:  # llhttp holds a part-received header line: count the raw bytes
            self._head_received += len(data)
            self._check_head_bytes(self._head_received)
        if self._receiving:
            self._stall = self._restart(self._stall, self.limits.read_timeout, self._stalled)

    def shutdown(self):
        if self._receiving or self._in_head:  # not yet work: a stalled client holds nothing
            self._close()
        else:
            super().shutdown()

    def timeout_keep_alive_handler(self):
        self._close()

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self):
        super().on_message_begin()
        self._receiving = self._in_head = True
        self._head_received = self._head_parsed = 0
        if self.limits.request_timeout:
            self._deadline = self._restart(self._deadline, self.limits.request_timeout,
                                           self._expired)
        self._stall = self._restart(self._stall, self.limits.read_timeout, self._stalled)

    def on_url(self, url):
        super().on_url(url)
        if not self._head_parsed:  # the method, a space, " HTTP/1.1\r\n", the closing "\r\n"
            self._head_parsed = len(self.parser.get_method()) + len(" HTTP/1.1\r\n") + 3
        self._head_parsed += len(url)
        self._check_head_bytes(self._head_parsed, raise_refusal=True)

    def on_header(self, name, value):
        super().on_header(name, value)
        self._head_parsed += len(name) + len(value) + 4  # ": " and the line end
        self._check_head_bytes(self._head_parsed, raise_refusal=True)

    def on_headers_complete(self):
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self):
        super().on_message_complete()
        self._receiving = False
        for timer in (self._deadline, self._stall):
            if timer is not None:
                timer.cancel()
        self._deadline = self._stall = None

    # ------------------------------------------------------------------------- answers
    def _check_head_bytes(self, size, raise_refusal=False):
        limit = self.limits.max_header_bytes
        if not limit or size <= limit:
            return
        message = (f"Request line and headers of more than {limit} bytes exceed this "
                   f"server's limit --rest_max_header_bytes={limit}")
        if raise_refusal:  # inside a callback: stops the parser
            raise _Refusal(431, message)
        self._answer_and_close(431, message)

    def _expired(self):
        self._deadline = None
        self._answer_and_close(
            408, f"Request not received in time: its line, headers and body must arrive "
                 f"within {self.limits.request_timeout:g}s of its first byte")

    def _stalled(self):
        self._stall = None
        if self.flow.read_paused:  # the server holds the bytes back (flow control, a
            # pipelined request waiting for the one before), not the client
            self._stall = self._restart(None, self.limits.read_timeout, self._stalled)
            return
        self._answer_and_close(408, f"Request not received: nothing arrived for "
                                    f"{self.limits.read_timeout:g}s")

    def _answer_and_close(self, status, message):
        """Answers the request being received with a JSON error and closes the connection;
        a request the app has started on (its headers arrived) gets no other answer."""
        if self._closing:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # the app answered first (413, 503)
                self._close()
                return
            cycle.disconnected = True  # its receive() now ends, its send() writes nothing
            cycle.message_event.set()
        _LOG.debug("REST %s: %s", status, message)
        self.transport.write(_response(status, message))
        self._close()

    def _close(self):
        """Closes once the answer is written; aborts if the client does not take it within
        the read timeout."""
        self._closing = True
        self._receiving = self._in_head = False
        for timer in (self._deadline, self._stall):
            if timer is not None:
                timer.cancel()
        self._deadline = self._stall = None
        self.transport.close()
        if self._abort is None:
            self._abort = self.loop.call_later(self.limits.read_timeout, self.transport.abort)

    def _restart(self, timer, seconds, callback):
        if timer is not None:
            timer.cancel()
        return self.loop.call_later(seconds, callback)


def _response(status, message):
    """An HTTP/1.1 JSON error response that closes the connection, as bytes."""
    body = json.dumps({"error": errors.clip(message)}).encode()
    phrase = _PHRASES.get(status, "Error")
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_PHRASES = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class RestServer:
    """TF Serving's REST API on `host:port` (0: any free port, then `.port`).

    The socket listens from construction (a backlog of `SOMAXCONN`, so a burst of
    connections waits for the accept loop instead of being dropped); `start()` serves it on
    an event loop thread, `stop(grace)` stops accepting, closes idle and stalled connections,
    and waits up to `grace` seconds for requests that arrived whole.
    """

    def __init__(self, manager, host, port, budget=None, max_request_bytes=0, metrics=None,
                 metrics_path=None, max_json_depth=0, threads=0, limits=TransportLimits()):
        self.budget = budget if budget is not None else parsing.ByteBudget()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads or 4 * (os.cpu_count() or 1),
            thread_name_prefix="ifa-serve-rest")
        app = rest.RestApp(manager, self.executor, self.budget, max_request_bytes, metrics,
                           metrics_path, max_json_depth)
        protocol = type("RestProtocol", (_Protocol,), {"limits": limits})
        self._config = uvicorn.Config(
            app, http=protocol, loop="asyncio", lifespan="off", interface="asgi3",
            proxy_headers=False, server_header=False, access_log=False, log_config=None,
            timeout_keep_alive=limits.read_timeout, backlog=socket.SOMAXCONN)
        self._server = uvicorn.Server(self._config)
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        self.socket = socket.create_server(address, family=family, backlog=socket.SOMAXCONN)
        self.address = self.socket.getsockname()
        self.port = self.address[1]
        self._thread = None
        # uvicorn's info lines (started, shutting down) repeat ifa-serve's own.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    def start(self, timeout=30.0):
        self._thread = threading.Thread(target=self._run, name="ifa-serve-rest", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"The REST server did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def _run(self):
        asyncio.run(self._server.serve(sockets=[self.socket]))

    def begin_stop(self, grace=30.0):
        """Stops accepting connections and closes idle and stalled ones; requests that
        arrived whole get `grace` seconds to be answered. Returns at once."""
        self._config.timeout_graceful_shutdown = grace
        self._server.should_exit = True

    def stop(self, grace=30.0):
        """`begin_stop`, then waits for the requests in flight (up to `grace` seconds)."""
        if self._thread is None:
            self.socket.close()
        else:
            if not self._server.should_exit:
                self.begin_stop(grace)
            self._thread.join(grace + 5)
            if self._thread.is_alive():
                _LOG.warning("REST requests still running after %.0fs; leaving them", grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
