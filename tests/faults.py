"""A fault-injecting HTTP proxy for S3 traffic on loopback: real sockets, real faults.

:class:`FaultProxy` sits between S3 clients (raysr.storage's boto3, for raysr's own reads and writes
and for Ray's run storage) and an S3 endpoint (moto's server). It reads each request's head and body
framing itself (so it knows where one request ends and the next begins on a keep-alive
connection) and pumps the replies back as raw bytes. Armed :class:`Fault` s hit the requests
they match:

    reset       the connection is closed with a TCP RST before the request is forwarded
    slowdown    answered ``503 SlowDown`` with S3's XML error body (the request never reaches S3)
    delay       forwarded after ``seconds`` (a slow endpoint)
    cut_reply   the reply is cut off after ``after_bytes`` bytes (counted only when a reply is that long)
    cut_upload  the request body is cut off after ``after_bytes`` bytes, then both sides are reset

A fault given ``when`` hits only the requests whose sending process (its pid, looked up in /proc
for such faults alone, once per request) it accepts: the requests of one Ray worker group and not of
its restarted successor, say. ``when`` runs under the proxy's lock: it must not call the proxy.

Every request is logged (method, path, whether it asked for a byte range, the fault that hit it),
so a test can count the retries a client made and see that each fault really happened.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("reset", "slowdown", "delay", "cut_reply", "cut_upload")

SLOWDOWN_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 "<Message>Please reduce your request rate.</Message><RequestId>{id}</RequestId>"
                 "<HostId>raysr-fault-proxy</HostId></Error>")


@dataclass
class Fault:
    """One kind of fault for the next ``times`` requests whose method is ``method`` (any when None),
    whose path (``/bucket/key?query``) contains ``path`` and, if ``when`` is given, whose sending
    process ``when(pid)`` accepts (pid None: the process was not found)."""

    kind: str
    times: int = 1
    method: str | None = None
    path: str = ""
    after_bytes: int = 0  # cut_reply, cut_upload: bytes let through before the cut
    seconds: float = 0.0  # delay
    when: Callable[[int | None], bool] | None = None
    fired: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose one of {KINDS}")

    def matches(self, method: str, path: str, sender: Callable[[], int | None]) -> bool:
        """Whether this fault hits the request; ``sender()``: the pid of the process that sent it."""
        return (self.fired < self.times and (self.method is None or self.method == method) and self.path in path
                and (self.when is None or self.when(sender())))


@dataclass
class Request:
    method: str
    path: str
    ranged: bool
    fault: str | None  # the request fault that hit it (a cut reply is counted on its Fault)
    peer: tuple[str, int]  # the client's address: which process sent it


class _Connection:
    """One client connection: its socket, a read buffer, and the reply-cut armed for its current request."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.peer = client.getpeername()
        self.buffer = b""
        self.upstream: socket.socket | None = None
        self.reply_sent = 0
        self.reply_cut: Fault | None = None

    def read_until(self, marker: bytes) -> bytes | None:
        """Bytes up to and including ``marker``; None if the client closed first."""
        while marker not in self.buffer:
            data = self.client.recv(65536)
            if not data:
                return None
            self.buffer += data
        end = self.buffer.index(marker) + len(marker)
        out, self.buffer = self.buffer[:end], self.buffer[end:]
        return out

    def read_some(self, limit: int) -> bytes:
        """At most ``limit`` bytes (at least one); raises ConnectionError if the client closed."""
        if not self.buffer:
            self.buffer = self.client.recv(65536)
            if not self.buffer:
                raise ConnectionError("client closed in the middle of a request body")
        out, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return out


def _reset(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    except OSError:
        pass
    sock.close()


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the other side is gone already
    sock.close()


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` (``http://host:port``); ``url`` is its address.

    Passes everything through until :meth:`arm` gives it faults; :attr:`requests` logs every request.
    """

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    # ---- what tests use

    def arm(self, *faults: Fault) -> list[Fault]:
        with self.lock:
            self.faults.extend(faults)
        return list(faults)

    def clear(self) -> None:
        """Disarm every fault and forget the request log."""
        with self.lock:
            self.faults.clear()
            self.requests.clear()

    def count(self, method: str | None = None, path: str = "", ranged: bool | None = None) -> int:
        """Logged requests with that method (any when None), a path containing ``path`` and, unless
        None, that asked for a byte range or not."""
        with self.lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and path in r.path
                       and (ranged is None or r.ranged == ranged))

    def close(self) -> None:
        self.server.close()

    # ---- the proxy

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(_Connection(client),), daemon=True).start()

    def _pick(self, method: str, path: str, head: bytes, peer) -> tuple[Fault | None, Fault | None]:
        """(the fault for this request, a cut_reply armed for its reply), logged. A request fault is
        used up here; a cut_reply when it cuts a reply, as only a reply that long can be cut."""
        sender = functools.cache(lambda: pid_of_client(peer, self.port))
        with self.lock:
            fault = next((f for f in self.faults if f.kind != "cut_reply" and f.matches(method, path, sender)), None)
            cut = next((f for f in self.faults if f.kind == "cut_reply" and f.matches(method, path, sender)), None)
            if fault is not None:
                fault.fired += 1
            self.requests.append(Request(method, path, b"\r\nrange: bytes=" in head.lower(),
                                         fault.kind if fault else None, peer))
        return fault, cut

    def _serve(self, conn: _Connection) -> None:
        try:
            while True:
                head = conn.read_until(b"\r\n\r\n")
                if head is None:
                    break
                if not self._forward(conn, head):
                    return
        except OSError:
            pass  # either side went away; the client sees a broken connection, as in real life
        _shutdown(conn.client)
        _shutdown(conn.upstream)

    def _forward(self, conn: _Connection, head: bytes) -> bool:
        """Handle one request; False when the connection is finished with."""
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        fault, cut = self._pick(method, path, head, conn.peer)
        kind = fault.kind if fault else None
        if kind == "reset":
            _reset(conn.client)
            _reset(conn.upstream)
            return False
        if kind == "slowdown":
            # A client that waits for "100 Continue" has not sent its body; any other one has, and
            # it must be read, or closing the socket turns the 503 into a reset.
            if headers.get("expect", "").lower() != "100-continue":
                self._body(conn, headers, None)
            self._slowdown(conn, method)
            return False
        if kind == "delay":
            time.sleep(fault.seconds)
        if conn.upstream is None:
            conn.upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump_replies, args=(conn,), daemon=True).start()
        conn.reply_sent, conn.reply_cut = 0, cut
        conn.upstream.sendall(head)
        if kind == "cut_upload":
            self._body(conn, headers, conn.upstream, cut_after=fault.after_bytes)
            _reset(conn.upstream)
            _reset(conn.client)
            return False
        self._body(conn, headers, conn.upstream)
        return True

    def _body(self, conn: _Connection, headers: dict, sink: socket.socket | None, cut_after: int | None = None):
        """Read the request body (Content-Length or chunked), sending it to ``sink`` (dropped if None);
        with ``cut_after``, stop after that many bytes."""
        budget = [cut_after if cut_after is not None else float("inf")]

        def send(data: bytes) -> bool:
            data = data[:int(min(len(data), budget[0]))]
            budget[0] -= len(data)
            if sink is not None and data:
                sink.sendall(data)
            return budget[0] > 0

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = conn.read_until(b"\r\n")
                if size_line is None or not send(size_line):
                    return
                size = int(size_line.split(b";")[0], 16)
                if size == 0:  # trailers, then an empty line
                    while True:
                        line = conn.read_until(b"\r\n")
                        if line is None or not send(line) or line == b"\r\n":
                            return
                self._copy(conn, size + 2, send)  # chunk data and its CRLF
                if budget[0] <= 0:
                    return
        else:
            self._copy(conn, int(headers.get("content-length", 0)), send)

    @staticmethod
    def _copy(conn: _Connection, n: int, send) -> None:
        while n > 0:
            data = conn.read_some(min(n, 65536))
            n -= len(data)
            if not send(data):
                return

    def _slowdown(self, conn: _Connection, method: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = b"" if method == "HEAD" else SLOWDOWN_BODY.format(id=request_id).encode()
        length = len(SLOWDOWN_BODY.format(id=request_id))
        conn.client.sendall((f"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             f"Content-Length: {length if method == 'HEAD' else len(body)}\r\n"
                             f"x-amz-request-id: {request_id}\r\nConnection: close\r\n\r\n").encode() + body)
        _shutdown(conn.client)
        _shutdown(conn.upstream)

    def _pump_replies(self, conn: _Connection) -> None:
        try:
            while True:
                data = conn.upstream.recv(65536)
                if not data:
                    break
                cut = conn.reply_cut
                if cut is not None and conn.reply_sent + len(data) > cut.after_bytes and self._consume(cut):
                    conn.client.sendall(data[:cut.after_bytes - conn.reply_sent])
                    break
                conn.client.sendall(data)
                conn.reply_sent += len(data)
        except OSError:
            pass
        _shutdown(conn.client)
        _shutdown(conn.upstream)

    def _consume(self, fault: Fault) -> bool:
        with self.lock:
            if fault.fired < fault.times:
                fault.fired += 1
                return True
        return False


def pid_of_client(peer: tuple[str, int], server_port: int | None = None) -> int | None:
    """The process that owns the open loopback TCP connection bound to ``peer`` (a client of the proxy,
    whose port ``server_port`` narrows it down to, when given), from /proc (Linux); None if it is
    gone. This is how a test finds the process behind a request."""
    port = f"{peer[1]:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            # local address 127.0.0.1:port, connected (state 01; a closed one lingers with inode 0), and,
            # the same port being reusable towards other addresses, to the proxy
            if (fields[1] == f"0100007F:{port}" and fields[3] == "01" and fields[9] != "0"
                    and (server_port is None or fields[2] == f"0100007F:{server_port:04X}")):
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:  # a process that ended meanwhile, or one that is not ours
            continue
    return None
