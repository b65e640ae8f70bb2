"""The agent's HTTP server as one I/O loop plus a worker pool (edge_agent.http): many keep-alive
clients at once, pipelining, requests arriving a byte at a time, large requests in the pool,
clients that do not read their answers, idle timeouts, protocol refusals, and a clean stop.
Real agents, real sockets; every wait is a socket timeout or a condition with a deadline."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from edge_agent.http import INLINE_BODY_BYTES, OUT_HIGH, SLOW_S, HttpApi
from edge_agent.service import AgentService
from tests.agent_fixtures import bundle_bytes, dataset, install_active, make_config
from tests.brokers import wait_until

TOKEN = "loop-token"
TIMEOUT = 10.0


@pytest.fixture
def served(tmp_path):
    """An agent with the LR bundle active, HTTP on a free port and a Unix socket, a token."""
    sock_path = str(tmp_path / "agent.sock")
    config = make_config(tmp_path, telemetry={"window_s": 3600},
                         http={"token": TOKEN, "unix_socket": sock_path, "max_rows": 1000})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config).start()
    yield service
    service.stop()


def rows(n: int, offset: int = 0) -> list[list[float]]:
    x, _ = dataset()
    return [[round(float(v), 6) for v in x[(offset + i) % len(x)]] for i in range(n)]


def request(method: str, path: str, body: bytes | None = None, *, token: str | None = TOKEN,
            version: str = "HTTP/1.1", extra: str = "") -> bytes:
    head = f"{method} {path} {version}\r\nHost: localhost\r\n{extra}"  # the agent answers only its own names
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def predict_request(rs: list[list[float]], **kw) -> bytes:
    return request("POST", "/v1/predict", json.dumps({"rows": rs}).encode(), **kw)


class Client:
    """A raw keep-alive connection that frames answers by Content-Length."""

    def __init__(self, address: tuple[str, int] | str) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = end + 4 + int(headers.get("content-length", "0"))
        while len(self.buf) < size:
            self._more()
        body, self.buf = self.buf[end + 4 : size], self.buf[size:]
        return status, headers, body

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the agent")
        self.buf += data

    def closed_by_agent(self) -> bool:
        """True once the agent closed the connection (EOF or reset), after any buffered answers."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def expected_labels(service: AgentService, rs: list[list[float]]) -> list:
    return service.agent.predict(rs).output.primary


def test_many_keepalive_clients_get_their_own_answers(served):
    """16 concurrent keep-alive clients (TCP and Unix socket), each with its own rows: every
    answer matches the in-process prediction for that client's rows."""
    service = served
    address, unix = service.http.address, service.config.http.unix_socket
    per_client = [rows(3, offset=7 * i) for i in range(16)]
    want = [expected_labels(service, rs) for rs in per_client]
    failures: list[str] = []

    def client(i: int) -> None:
        c = Client(unix if i % 4 == 3 else address)
        try:
            for _ in range(100):
                c.send(predict_request(per_client[i]))
                status, _, body = c.answer()
                got = json.loads(body)
                if status != 200 or got["predictions"] != want[i]:
                    failures.append(f"client {i}: {status} {body[:200]!r}")
                    return
        except Exception as exc:  # reported below, with the client
            failures.append(f"client {i}: {exc!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()]
    assert failures == []


def test_pipelined_requests_are_answered_in_order(served):
    """Requests sent in one write, some answered on the loop and some in the pool (GETs, a large
    body): the answers come back in request order on the same connection."""
    service = served
    small, large = rows(1, 3), rows(400, 11)
    assert len(json.dumps({"rows": large})) > INLINE_BODY_BYTES
    c = Client(service.http.address)
    try:
        c.send(predict_request(small) + request("GET", "/v1/health") + predict_request(large)
               + request("GET", "/nope") + request("GET", "/v1/model") + predict_request(small)
               + request("POST", "/v1/feedback", b'{"id": "unknown-1", "label": 1}'))
        answers = [c.answer() for _ in range(7)]
    finally:
        c.close()
    assert [a[0] for a in answers] == [200, 200, 200, 404, 200, 200, 200]
    assert json.loads(answers[0][2])["predictions"] == expected_labels(service, small)
    assert json.loads(answers[1][2])["status"] == "ok"
    assert json.loads(answers[2][2])["predictions"] == expected_labels(service, large)
    assert json.loads(answers[3][2])["error"] == "not_found"
    assert json.loads(answers[4][2])["version"] == "1.0.0"
    assert json.loads(answers[5][2])["predictions"] == expected_labels(service, small)
    assert json.loads(answers[6][2])["unknown"] == 1


def test_request_arriving_a_byte_at_a_time(served):
    service = served
    c = Client(service.http.address)
    try:
        data = b"\r\n" + predict_request(rows(2))  # a stray line end before a request is allowed
        for i in range(len(data)):
            c.send(data[i : i + 1])
        status, _, body = c.answer()
    finally:
        c.close()
    assert status == 200 and json.loads(body)["predictions"] == expected_labels(service, rows(2))


def test_expect_100_continue_then_body(served):
    service = served
    body = json.dumps({"rows": rows(1)}).encode()
    c = Client(service.http.address)
    try:
        c.send(request("POST", "/v1/predict", body, extra="Expect: 100-continue\r\n")[: -len(body)])
        assert c.answer()[0] == 100
        c.send(body)
        status, _, answer = c.answer()
    finally:
        c.close()
    assert status == 200 and json.loads(answer)["predictions"] == expected_labels(service, rows(1))


def test_large_requests_and_half_sent_ones_do_not_hold_up_small_ones(served):
    """One client sends max_rows-row requests (answered in the pool), another sends half a
    request and stalls: a third client's small requests are answered all the while."""
    service = served
    address = service.http.address
    large = rows(1000)
    large_labels = expected_labels(service, large)
    stalled = Client(address)
    stalled.send(predict_request(rows(1))[:-5])
    done = threading.Event()
    failures: list[str] = []

    def big_client() -> None:
        c = Client(address)
        try:
            for _ in range(5):
                c.send(predict_request(large))
                status, _, body = c.answer()
                if status != 200 or json.loads(body)["predictions"] != large_labels:
                    failures.append(f"{status} {body[:200]!r}")
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            c.close()
            done.set()

    big = threading.Thread(target=big_client)
    big.start()
    small = Client(address)
    try:
        served_small = 0
        while not done.is_set() or served_small < 50:
            small.send(predict_request(rows(1, served_small)))
            status, _, body = small.answer()
            assert status == 200, body
            served_small += 1
        big.join(TIMEOUT)
        assert failures == []
        # The stalled request is still waiting for its last bytes: complete it.
        stalled.send(predict_request(rows(1))[-5:])
        assert stalled.answer()[0] == 200
    finally:
        small.close()
        stalled.close()


def test_client_that_does_not_read_its_answers_does_not_block_others(served):
    """A client pipelines far more answers than the socket buffers hold and reads nothing for a
    while: the agent stops reading it (back-pressure), serves another client meanwhile, and
    every pipelined answer arrives, in order, once the first client reads."""
    service = served
    address = service.http.address
    one = predict_request(rows(1))
    n = 4 * (OUT_HIGH // 200) + 20_000  # answers are ~200 bytes: several MiB of them
    greedy = Client(address)
    sender = threading.Thread(target=greedy.send, args=(one * n,))
    sender.start()
    other = Client(address)
    try:
        for i in range(20):
            other.send(predict_request(rows(1, i)))
            assert other.answer()[0] == 200
        want = expected_labels(service, rows(1))
        for _ in range(n):
            status, _, body = greedy.answer()
            assert status == 200 and json.loads(body)["predictions"] == want
        sender.join(TIMEOUT)
        assert not sender.is_alive()
    finally:
        other.close()
        greedy.close()


def test_idle_and_stalled_connections_are_closed_after_the_idle_timeout(tmp_path):
    config = make_config(tmp_path, telemetry={"window_s": 3600})
    install_active(config.path, bundle_bytes("lr", "1.0.0"))
    service = AgentService(config)
    service.http.idle_timeout_s = 0.5
    service.start()
    try:
        address = service.http.address
        idle, stalled, busy = Client(address), Client(address), Client(address)
        stalled.send(predict_request(rows(1), token=None)[:-3])
        busy.send(predict_request(rows(1), token=None))
        assert busy.answer()[0] == 200
        assert idle.closed_by_agent()  # blocks (up to TIMEOUT) until the agent closes it
        assert stalled.closed_by_agent()
        assert busy.closed_by_agent()  # idle after its answer
        fresh = Client(address)
        fresh.send(predict_request(rows(1), token=None))
        assert fresh.answer()[0] == 200
        for c in (idle, stalled, busy, fresh):
            c.close()
    finally:
        service.stop()


def test_connection_close_and_http_1_0(served):
    address = served.http.address
    c = Client(address)
    c.send(predict_request(rows(1), extra="Connection: close\r\n"))
    status, headers, _ = c.answer()
    assert status == 200 and headers["connection"] == "close" and c.closed_by_agent()
    c.close()
    c = Client(address)
    c.send(predict_request(rows(1), version="HTTP/1.0"))
    status, headers, _ = c.answer()
    assert status == 200 and headers["connection"] == "close" and c.closed_by_agent()
    c.close()
    c = Client(address)  # HTTP/1.0 asking for keep-alive keeps the connection
    try:
        for _ in range(3):
            c.send(predict_request(rows(1), version="HTTP/1.0", extra="Connection: keep-alive\r\n"))
            status, headers, _ = c.answer()
            assert status == 200 and "connection" not in headers
    finally:
        c.close()


REFUSALS = [
    # (raw request, status, error kind or None, connection closed after the answer)
    (b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411, "length_required", True),
    (b"GET /v1/health HTTP/2.0\r\n\r\n", 505, "bad_request", True),
    (b"GET /v1/health\r\n\r\n", 400, "bad_request", True),
    (b"GET /v1/health HTTP/1.1\r\nno colon\r\n\r\n", 400, "bad_request", True),
    (b"GET /v1/health HTTP/1.1\r\nX-Big: " + b"x" * (70 * 1024), 431, "bad_request", True),
    (b"PUT /v1/predict HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd", 501, "not_implemented", False),
    (b"POST /v1/predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n", 401, "unauthorized", True),
    (b"GET /v1/health HTTP/1.1\r\n\r\n", 401, "unauthorized", False),
    (b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\r\nContent-Length: 99999999999\r\n\r\n", 413, "body_too_large", True),
    (b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\r\nContent-Length: 5\r\n\r\n{nope", 400, "malformed_json", False),
    # Framing that int() would take but an upstream proxy might read otherwise: refused, closed.
    *[(b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
       + b"\r\nContent-Length: " + length + b"\r\n\r\n{}", 400, "bad_request", True)
      for length in (b"+2", b"0_2", b"2 2", b"\xd9\xa2")],  # the last: an Arabic-Indic digit 2
    (b"POST /v1/predict HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", 400, "bad_request", True),
]


@pytest.mark.parametrize("raw,status,kind,closes", REFUSALS, ids=[str(r[1]) + "-" + str(i) for i, r in
                                                                  enumerate(REFUSALS)])
def test_refusals(served, raw, status, kind, closes):
    c = Client(served.http.address)
    try:
        c.send(raw)
        got, headers, body = c.answer()
        assert got == status and json.loads(body)["error"] == kind
        assert (headers.get("connection") == "close") == closes
        if closes:
            assert c.closed_by_agent()
        else:  # the same connection goes on
            c.send(predict_request(rows(1)))
            assert c.answer()[0] == 200
    finally:
        c.close()


def test_stop_closes_connections_and_the_unix_socket(served):
    service = served
    address, unix = service.http.address, service.config.http.unix_socket
    tcp, local = Client(address), Client(unix)
    for c in (tcp, local):
        c.send(request("GET", "/v1/health"))
        assert c.answer()[0] == 200
    half = Client(address)
    half.send(predict_request(rows(1))[:-2])
    service.http.stop()
    assert tcp.closed_by_agent() and local.closed_by_agent() and half.closed_by_agent()
    assert not Path(unix).exists() and service.http.address is None
    for c in (tcp, local, half):
        c.close()
    # The port is free again at once: a new server binds it.
    service.config.http.listen = f"{address[0]}:{address[1]}"
    again = HttpApi(service.agent).start()
    try:
        assert again.address == address
        c = Client(address)
        c.send(predict_request(rows(1)))
        assert c.answer()[0] == 200
        c.close()
    finally:
        again.stop()


def test_slow_model_detection_goes_both_ways(served):
    """Mostly slow predict/feedback requests send them to the pool; mostly fast ones bring them
    back to the loop (one slow request among fast ones changes nothing)."""
    loop = served.http._loop
    assert loop is not None and not loop.slow
    loop.observe(SLOW_S * 50)
    assert not loop.slow
    for _ in range(8):
        loop.observe(SLOW_S * 2)
    assert loop.slow
    # Requests now go through the pool and are still answered.
    c = Client(served.http.address)
    try:
        c.send(predict_request(rows(1)))
        assert c.answer()[0] == 200
        wait_until(lambda: c.send(predict_request(rows(1))) or (c.answer()[0] == 200 and not loop.slow), TIMEOUT,
                   message="fast answers bring requests back to the loop")
    finally:
        c.close()
