"""ifa-serve's version loading and REST transport under hostile conditions: failed loads
retried by directory content with back-off, version names beyond int64, and raw-socket
requests on loopback (malformed framing, chunked bodies, stalled and idle clients, a burst of
connections, shutdown with a stalled client)."""

import http.client
import json
import logging
import os
import shutil
import socket
import threading
import time

import pytest

from ifa_tf import export
from ifa_tf.serving import http_server, parsing, rest
from ifa_tf.serving.model_manager import ModelConfig, ModelManager, Signature, State
from ifa_tf.serving.server import ModelServer, ServerOptions
from test_serving import free_port
from test_serving_config import SCHEMA, tiny_model  # noqa: F401 (a fixture used by name)

MAX_REQUEST_BYTES = 1_000_000
READ_TIMEOUT_SECONDS = 1.0


@pytest.fixture(scope="module")
def good_version(tiny_model, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """A complete exported version directory, copied into each test's base path."""
    base = tmp_path_factory.mktemp("export")
    return export.export_saved_model(tiny_model, base, schema=SCHEMA, warmup_shapes=())


def manager_for(base, poll_wait_seconds=0.01, **kwargs):
    """A manager the test polls by hand (`poll()`, never `start()`, so no polling thread)."""
    return ModelManager([ModelConfig("m", str(base))], poll_wait_seconds, **kwargs)


def states(manager):
    return {version: (state, message) for version, state, message in manager.status("m")}


def poll_until(manager, condition, polls=5, pause=0.05):
    for _ in range(polls):
        manager.poll()
        if condition():
            return True
        time.sleep(pause)
    return False


def served_version(manager):
    return manager.resolve("m").version


# ------------------------------------------------------------------------- version loading
def test_a_failed_version_replaced_in_place_is_loaded(good_version, tmp_path):
    """Defect 2: a truncated version 3, then a good version 3 renamed into its place."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, max_load_retries=0)
    manager.poll()
    shutil.copytree(good_version, base / "3")
    pb = base / "3" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:100])
    manager.poll()
    assert served_version(manager) == 1
    assert states(manager)[3][0] == State.END
    assert "Failed to load servable version 3" in states(manager)[3][1]
    shutil.rmtree(base / "3")
    shutil.copytree(good_version, tmp_path / "staging")
    os.rename(tmp_path / "staging", base / "3")
    assert poll_until(manager, lambda: states(manager)[3][0] == State.AVAILABLE)
    assert served_version(manager) == 3
    assert states(manager)[3] == (State.AVAILABLE, "")
    assert states(manager)[1] == (State.END, "")


def test_a_version_whose_files_arrive_late_loads_once_they_are_complete(good_version,
                                                                        tmp_path):
    """Defect 2: a slow non-atomic copy; the load fails until saved_model.pb arrives, long
    after the retries ran out."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, max_load_retries=1)
    manager.poll()
    (base / "2").mkdir()
    shutil.copytree(os.path.join(good_version, "variables"), base / "2" / "variables")
    for _ in range(4):  # the first load and its one retry fail; then it is left alone
        time.sleep(0.05)
        manager.poll()
    assert served_version(manager) == 1
    assert states(manager)[2][0] == State.END
    for name in sorted(os.listdir(good_version)):
        source = os.path.join(good_version, name)
        if os.path.isfile(source):
            shutil.copy2(source, base / "2" / name)
        elif name != "variables":
            shutil.copytree(source, base / "2" / name)
    assert poll_until(manager, lambda: served_version(manager) == 2)
    assert states(manager)[2] == (State.AVAILABLE, "")


def test_a_broken_version_is_retried_with_back_off_then_left_alone(good_version, tmp_path,
                                                                   caplog):
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base, poll_wait_seconds=0.1, max_load_retries=4,
                          load_retry_interval_seconds=0.4)
    manager.poll()
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    with caplog.at_level(logging.ERROR, logger="ifa_serve"):
        deadline = time.monotonic() + 2.5  # the four retries are due by 0.1 + 0.2 + 0.4 + 0.4 s
        while time.monotonic() < deadline:
            manager.poll()
            time.sleep(0.02)
    failures = [record for record in caplog.records
                if "Failed to load servable version 2 of m" in record.getMessage()]
    assert len(failures) == 5  # the load and max_load_retries retries
    waits = ("retry 1 of 4 in 0.1s", "retry 2 of 4 in 0.2s", "retry 3 of 4 in 0.4s",
             "retry 4 of 4 in 0.4s", "no retries left")
    for record, wait in zip(failures, waits):
        assert wait in record.getMessage()
    gaps = [later.created - earlier.created for earlier, later in zip(failures, failures[1:])]
    for gap, wait in zip(gaps, (0.1, 0.2, 0.4, 0.4)):
        assert gap >= wait - 0.01, gaps
    assert served_version(manager) == 1
    assert states(manager)[2][0] == State.END


def test_version_names_follow_tf_serving_rules(good_version, tmp_path, caplog):
    """Defect 3: a loadable SavedModel named 99999999999999999999 must not become latest;
    a zero-padded name is its number, loaded from that directory."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "0002")
    huge = "99999999999999999999"
    shutil.copytree(good_version, base / huge)
    manager = manager_for(base)
    with caplog.at_level(logging.WARNING, logger="ifa_serve"):
        manager.poll()
        manager.poll()
        manager.poll()
    assert served_version(manager) == 2
    assert manager.resolve("m").path == str(base / "0002")
    assert [version for version, *_ in manager.status("m")] == [2]
    warnings = [r.getMessage() for r in caplog.records if huge in r.getMessage()]
    assert len(warnings) == 1 and "does not fit int64" in warnings[0]
    status = rest.status_json(manager, "m", None, None)  # REST status answered 500
    assert [v["version"] for v in status["model_version_status"]] == ["2"]
    assert export.next_version(base) == 3
    with pytest.raises(ValueError, match="fits int64"):
        export.export_saved_model(None, base, version=int(huge))


# ---------------------------------------------------------------------------- REST transport
@pytest.fixture(scope="module")
def rest_server(good_version, tmp_path_factory):
    base = tmp_path_factory.mktemp("rest") / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base)
    manager.poll()
    server = http_server.RestServer(
        manager, "127.0.0.1", 0, max_request_bytes=MAX_REQUEST_BYTES,
        limits=http_server.TransportLimits(read_timeout=READ_TIMEOUT_SECONDS)).start()
    yield server.port
    server.stop(grace=1)


@pytest.fixture(scope="module")
def predict_body(tiny_model):  # noqa: F811 (the imported fixture)
    features = export.random_features(export.serving_specs(tiny_model), 1, 5, 7)
    return json.dumps({"inputs": {k: v.tolist() for k, v in features.items()}}).encode()


def connect(port, timeout=5.0):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def exchange(port, head, body=b"", timeout=5.0):
    """Sends a raw request; returns (status, parsed JSON body) of the answer."""
    with connect(port, timeout) as sock:
        sock.sendall(head.replace(b"\n", b"\r\n") + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def post_head(port, **headers):
    lines = [b"POST /v1/models/m:predict HTTP/1.1", f"Host: 127.0.0.1:{port}".encode()]
    lines += [f"{name.replace('_', '-')}: {value}".encode() for name, value in headers.items()]
    return b"\n".join(lines) + b"\n"


def chunked(body, sizes):
    pieces, start = [], 0
    for size in sizes:
        pieces.append(b"%x;ext=1\r\n%s\r\n" % (size, body[start:start + size]))
        start += size
    return b"".join(pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"


# uvicorn's parser (llhttp) names what is wrong; a transfer coding other than chunked is
# 400, as RFC 9112 (6.1) requires of a request whose body length cannot be determined.
@pytest.mark.parametrize("headers, body, message", [
    ({"Content-Length": "abc"}, b"{}", "Invalid character in Content-Length"),
    ({"Content-Length": "-1"}, b"{}", "Invalid character in Content-Length"),
    ({"Content-Length": "2", "Transfer-Encoding": "chunked"}, b"{}",
     "Transfer-Encoding can't be present with Content-Length"),
    ({"Transfer-Encoding": "gzip"}, b"", "Request has invalid `Transfer-Encoding`"),
    ({"Transfer-Encoding": "chunked"}, b"zz\r\n", "Invalid character in chunk size"),
])
def test_rest_malformed_framing_is_a_clear_client_error(rest_server, headers, body, message):
    status, answer = exchange(rest_server, post_head(rest_server, **headers), body)
    assert status == 400 and answer["error"] == f"Malformed request: {message}", answer


def test_rest_conflicting_content_lengths_are_refused(rest_server):
    head = post_head(rest_server, Content_Length=2) + b"Content-Length: 3\n"
    assert exchange(rest_server, head, b"{}") == (
        400, {"error": "Malformed request: Duplicate Content-Length"})


@pytest.mark.parametrize("payload, message", [
    (b'{"signature_name": [1], "instances": [1]}', "signature_name must be a string"),
    (b'{"instances": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
])
def test_rest_malformed_json_is_400(rest_server, payload, message):
    answer = exchange(rest_server, post_head(rest_server, Content_Length=len(payload)), payload)
    assert answer[0] == 400 and message in answer[1]["error"], answer


def test_rest_chunked_body_is_decoded_and_bounded(rest_server, predict_body):
    plain = exchange(rest_server, post_head(rest_server, Content_Length=len(predict_body)),
                     predict_body)
    assert plain[0] == 200
    third = len(predict_body) // 3
    body = chunked(predict_body, (third, third, len(predict_body) - 2 * third))
    assert exchange(rest_server, post_head(rest_server, Transfer_Encoding="chunked"),
                    body) == plain
    oversized = chunked(b"x" * (MAX_REQUEST_BYTES + 2), [MAX_REQUEST_BYTES // 2 + 1] * 2)
    status, answer = exchange(rest_server, post_head(rest_server, Transfer_Encoding="chunked"),
                              oversized)
    assert status == 413 and "--max_request_bytes" in answer["error"]


def test_rest_idle_and_stalled_connections_are_closed(rest_server):
    with connect(rest_server) as idle:
        began = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server, not by this 5 s timeout
        assert time.monotonic() - began < READ_TIMEOUT_SECONDS + 3
    status, answer = exchange(rest_server, post_head(rest_server, Content_Length=100),
                              b'{"instances"')
    assert status == 408 and "nothing arrived for 1s" in answer["error"]


def test_rest_keep_alive_answers_do_not_wait_for_delayed_acks(rest_server):
    """Headers and body are two writes: under Nagle's algorithm the body waited for the
    client's delayed ACK, about 40 ms per request on a kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", rest_server, timeout=5)
    began = time.monotonic()
    for _ in range(20):
        connection.request("GET", "/v1/models/m")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    connection.close()
    assert time.monotonic() - began < 0.4  # 20 x 40 ms is 0.8 s


def test_rest_listen_backlog_holds_a_burst_of_connections():
    server = http_server.RestServer(None, "127.0.0.1", 0)  # listening, not accepting yet
    sockets = []
    try:
        for _ in range(32):  # a backlog of 5 drops the 7th SYN: its connect times out
            sockets.append(socket.create_connection(server.address, timeout=0.5))
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    assert len(sockets) == 32


def test_stop_does_not_wait_for_a_client_stalled_mid_body(good_version, tmp_path,
                                                          predict_body):
    """What SIGTERM runs: a client that sent half a body is not in-flight work."""
    shutil.copytree(good_version, tmp_path / "m" / "1")
    port = free_port()
    server = ModelServer(ServerOptions(model_name="m", model_base_path=str(tmp_path / "m"),
                                       port=0, rest_api_port=port,
                                       file_system_poll_wait_seconds=0,
                                       shutdown_grace_seconds=8)).start()
    with connect(port) as stalled:
        stalled.sendall(post_head(port, Content_Length=len(predict_body)).replace(
            b"\n", b"\r\n") + b"\r\n" + predict_body[:10])
        time.sleep(0.3)  # the handler thread is now blocked reading the body
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 4


def test_stop_lets_a_rest_request_being_answered_finish(good_version, tmp_path, predict_body,
                                                       monkeypatch):
    """What SIGTERM runs: a REST request whose body has arrived is answered; the port then
    refuses connections."""
    shutil.copytree(good_version, tmp_path / "m" / "1")
    port = free_port()
    server = ModelServer(ServerOptions(model_name="m", model_base_path=str(tmp_path / "m"),
                                       port=0, rest_api_port=port,
                                       file_system_poll_wait_seconds=0,
                                       shutdown_grace_seconds=10)).start()
    running = threading.Event()
    original_run = Signature.run

    def slow_run(self, *args, **kwargs):
        running.set()
        time.sleep(1.0)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "run", slow_run)
    answers = []
    client = threading.Thread(target=lambda: answers.append(exchange(
        port, post_head(port, Content_Length=len(predict_body)), predict_body, timeout=30)))
    client.start()
    assert running.wait(30)
    server.stop()
    client.join()
    assert [status for status, _ in answers] == [200]
    with pytest.raises(OSError):
        connect(port, timeout=2)


# ------------------------------------------------------------- REST caps (issue 24)
def capped_server(good_version, tmp_path, max_bytes_in_flight=0, **caps):
    """A started REST server over a copy of `good_version` with the caps given (those of
    `TransportLimits`, `max_bytes_in_flight` and `max_json_depth`); (port, server)."""
    base = tmp_path / "m"
    shutil.copytree(good_version, base / "1")
    manager = manager_for(base)
    manager.poll()
    limits = {key: caps.pop(key) for key in ("max_connections", "max_header_bytes",
                                             "request_timeout") if key in caps}
    server = http_server.RestServer(
        manager, "127.0.0.1", 0, parsing.ByteBudget(max_bytes_in_flight), MAX_REQUEST_BYTES,
        limits=http_server.TransportLimits(read_timeout=READ_TIMEOUT_SECONDS, **limits),
        **caps).start()
    return server.port, server


def test_rest_a_trickled_request_is_cut_off_at_its_deadline(good_version, tmp_path,
                                                            predict_body):
    """A byte every 0.4 s never trips the 1 s read timeout; the whole request must arrive
    within 2 s of its first byte all the same."""
    port, server = capped_server(good_version, tmp_path, request_timeout=2.0)
    try:
        for head, body in ((post_head(port, Content_Length=len(predict_body)), predict_body),
                           (b"GET /v1/models/m HTTP/1.1\nX-Slow: " + b"a" * 40, b"")):
            with connect(port, timeout=10) as sock:
                began = time.monotonic()
                data = head.replace(b"\n", b"\r\n") + (b"\r\n" + body if body else b"")
                answer = b""
                for index in range(len(data)):
                    try:
                        sock.sendall(data[index:index + 1])
                    except OSError:
                        break
                    if time.monotonic() - began > 5:
                        break
                    time.sleep(0.4)
                sock.settimeout(5)
                answer = sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 408"), answer
                assert b"must arrive within 2s of its first byte" in answer
                assert time.monotonic() - began < 4
        assert exchange(port, post_head(port, Content_Length=len(predict_body)),
                        predict_body)[0] == 200
    finally:
        server.stop(grace=1)


def test_rest_connections_over_the_cap_are_answered_503(good_version, tmp_path):
    port, server = capped_server(good_version, tmp_path, max_connections=2)
    try:
        held = [connect(port), connect(port)]
        time.sleep(0.2)  # both accepted
        with connect(port) as third:
            answer = third.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"--rest_max_connections" in answer
        for sock in held:
            sock.close()
        time.sleep(0.3)  # their threads end
        assert exchange(port, b"GET /v1/models/m HTTP/1.1\n")[0] == 200
    finally:
        server.stop(grace=1)


def test_rest_bodies_in_flight_are_capped(good_version, tmp_path, predict_body):
    port, server = capped_server(good_version, tmp_path,
                                 max_bytes_in_flight=len(predict_body) + 100)
    try:
        with connect(port) as stalled:  # reserves its whole declared body, sends a little
            stalled.sendall(post_head(port, Content_Length=len(predict_body)).replace(
                b"\n", b"\r\n") + b"\r\n" + predict_body[:10])
            time.sleep(0.3)
            assert server.budget.in_use == len(predict_body)
            status, answer = exchange(port, post_head(port, Content_Length=200), b"x" * 200)
            assert status == 503, answer
            assert "--max_bytes_in_flight" in answer["error"]
        time.sleep(0.3)  # the stalled client left: its reservation is released
        assert server.budget.in_use == 0
        assert exchange(port, post_head(port, Content_Length=len(predict_body)),
                        predict_body)[0] == 200
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])
def test_rest_other_methods_get_a_json_error(rest_server, method):
    connection = http.client.HTTPConnection("127.0.0.1", rest_server, timeout=5)
    connection.request(method, "/v1/models/m")
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 400
    assert response.headers["Content-Type"] == "application/json"
    if method != "HEAD":
        assert json.loads(body) == {"error": f"Malformed request: {method} /v1/models/m"}


@pytest.mark.parametrize("request_line", [b"GARBAGE", b"GET /v1/models/\xff HTTP/1.1"],
                         ids=["no method", "target not ASCII"])
def test_rest_malformed_request_line_gets_a_json_error(rest_server, request_line):
    with connect(rest_server) as sock:
        sock.sendall(request_line + b"\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 400
        assert json.loads(response.read())["error"].startswith("Malformed request: ")


@pytest.mark.parametrize("value", [False, True])
def test_rest_booleans_are_not_ids(rest_server, predict_body, value):
    payload = json.loads(predict_body)
    payload["inputs"]["cand_item_id"][0][1] = value
    body = json.dumps(payload).encode()
    status, answer = exchange(rest_server, post_head(rest_server, Content_Length=len(body)),
                              body)
    assert status == 400
    assert answer["error"] == (f"Input cand_item_id expects int64 values; received "
                               f"{json.dumps(value)}, not a number")
