"""
A faulty HTTP proxy of the tests' own, between s3fs and the test S3 server.

It listens on 127.0.0.1 (a free port), reads each HTTP request whole, and then,
as the test has set it at run time, forwards it to the server and returns the
answer, resets the connection, answers an error without forwarding, or holds
the connection without answering. It counts the requests it sees. It runs in
threads of the test process and reaches nothing but its upstream on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from typing import IO

import attrs

# How long to wait for the upstream server's answer before giving up.
_UPSTREAM_TIMEOUT = 30.0
# Headers that describe one hop's framing; the proxy frames its own.
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "expect"})
# The S3 error codes answered for each status, as a real endpoint would.
_ERROR_CODES = {
    500: "InternalError",
    502: "BadGateway",
    503: "SlowDown",
    504: "GatewayTimeout",
}


@attrs.frozen
class Request:
    """One HTTP request as the client sent it, its body unframed."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@attrs.define
class _Rule:
    """What to do with the requests that ``match``: a fault, how many, how often."""

    kind: str
    count: int | None
    every: int
    status: int = 500
    seconds: float = 0.0
    match: Callable[[Request], bool] | None = None
    after: bool = False
    matched: int = 0


class FaultProxy:
    """
    A proxy on a free loopback port whose faults the test sets while it runs.

    Faults apply to requests that match (all, unless ``match`` is given): the
    next ``count`` of them (``None``: every one until changed), or every
    ``every``-th. Setting a fault replaces the previous one.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname != "127.0.0.1" or parsed.port is None:
            msg = f"the proxy forwards to 127.0.0.1 only, not {upstream!r}"
            raise ValueError(msg)
        self._upstream = (parsed.hostname, parsed.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._rule: _Rule | None = None
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.requests = 0
        self.faults = 0
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def passthrough(self) -> None:
        """Forward every request from now on."""
        with self._lock:
            self._rule = None

    def reset(
        self,
        count: int | None = 1,
        *,
        every: int = 1,
        match: Callable[[Request], bool] | None = None,
        after: bool = False,
    ) -> None:
        """
        Reset the connection (TCP RST) instead of answering.

        ``after`` forwards the request first: the server acts on it, and its
        answer is lost.
        """
        self._set(_Rule("reset", count, every, match=match, after=after))

    def answer(
        self,
        status: int,
        count: int | None = 1,
        *,
        every: int = 1,
        match: Callable[[Request], bool] | None = None,
    ) -> None:
        """Answer ``status`` with an S3 error body, without forwarding."""
        self._set(_Rule("answer", count, every, status=status, match=match))

    def stall(
        self,
        seconds: float,
        count: int | None = 1,
        *,
        every: int = 1,
        match: Callable[[Request], bool] | None = None,
    ) -> None:
        """Hold the connection without answering for ``seconds``, then close it."""
        self._set(_Rule("stall", count, every, seconds=seconds, match=match))

    def stop(self) -> None:
        """Stop accepting, close every connection, and wait for the threads."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        self._accepter.join(10)
        for thread in list(self._threads):
            thread.join(10)

    def _set(self, rule: _Rule) -> None:
        with self._lock:
            self._rule = rule

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(client)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream = http.client.HTTPConnection(
            *self._upstream, timeout=_UPSTREAM_TIMEOUT
        )
        reader = client.makefile("rb")
        try:
            while not self._stopped.is_set() and self._serve_one(
                client, reader, upstream
            ):
                pass
        except OSError:
            pass
        finally:
            reader.close()
            upstream.close()
            with self._lock:
                self._clients.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _serve_one(
        self,
        client: socket.socket,
        reader: IO[bytes],
        upstream: http.client.HTTPConnection,
    ) -> bool:
        """Serve one request; return whether the connection stays open."""
        request = _read_request(client, reader)
        if request is None:
            return False
        rule = self._fault(request)
        if rule is None:
            client.sendall(_forward(upstream, request))
            return True
        if rule.kind == "reset":
            if rule.after:
                _forward(upstream, request)
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            return False
        if rule.kind == "answer":
            client.sendall(_error_answer(rule.status, request.method == "HEAD"))
            return True
        self._stopped.wait(rule.seconds)
        return False

    def _fault(self, request: Request) -> _Rule | None:
        """Count the request; return the rule whose fault it gets, if any."""
        with self._lock:
            self.requests += 1
            rule = self._rule
            if rule is None or (rule.match is not None and not rule.match(request)):
                return None
            rule.matched += 1
            if rule.matched % rule.every:
                return None
            if rule.count is not None:
                if rule.count <= 0:
                    return None
                rule.count -= 1
            self.faults += 1
            return rule


def _read_request(client: socket.socket, reader: IO[bytes]) -> Request | None:
    line = reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = []
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    found = {name.lower(): value for name, value in headers}
    if found.get("expect", "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if found.get("transfer-encoding", "").lower() == "chunked":
        body = _read_chunked(reader)
    else:
        body = reader.read(int(found.get("content-length", "0")))

    return Request(method, target, headers, body)


def _read_chunked(reader: IO[bytes]) -> bytes:
    parts = []
    while size := int(reader.readline().split(b";")[0], 16):
        parts.append(reader.read(size))
        reader.readline()
    while reader.readline() not in (b"\r\n", b"\n", b""):
        pass
    return b"".join(parts)


def _forward(upstream: http.client.HTTPConnection, request: Request) -> bytes:
    """Send the request upstream; return its answer as bytes to send back."""
    upstream.putrequest(
        request.method, request.target, skip_host=True, skip_accept_encoding=True
    )
    for name, value in request.headers:
        if name.lower() not in _HOP_HEADERS:
            upstream.putheader(name, value)
    upstream.putheader("Content-Length", str(len(request.body)))
    upstream.endheaders(request.body)
    response = upstream.getresponse()
    body = response.read()
    keep_length = request.method == "HEAD" or response.status in (204, 304)
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    for name, value in response.getheaders():
        if name.lower() not in _HOP_HEADERS or (
            keep_length and name.lower() == "content-length"
        ):
            lines.append(f"{name}: {value}")
    if not keep_length:
        lines.append(f"Content-Length: {len(body)}")

    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error_answer(status: int, head_only: bool) -> bytes:
    code = _ERROR_CODES.get(status, "InternalError")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
