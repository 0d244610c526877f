"""A lean HTTP/1.1 load generator and lean upstream stand-ins for ``scripts/bench_router.py``.

Both are raw asyncio protocols over keep-alive connections, with no web framework, so that at hundreds of
requests per second on a small machine the benchmark measures the proxy in the middle rather than the client
or the upstreams.

* :class:`LeanClient`: sends a prepared request on an idle keep-alive connection to the address (a new one
  when none is idle) and reads the answer in ``data_received``: the time its first body byte arrived, the
  time it ended, its status, and its body when asked for. Bodies framed by ``Content-Length`` or chunked.
* :func:`serve_upstream` (``python -m deflectlab.scripts.lean_http --role prefill|decode --port N``): a
  stand-in for a vLLM prefill or decode instance that answers at once. ``POST /v1/completions`` and
  ``/v1/chat/completions``: a prefill instance answers JSON with NixlConnector-style ``kv_transfer_params``
  (when the request asked for a remote decode); a decode instance streams ``max_tokens`` SSE events (8 when
  absent), one write each with ``--token-gap-ms`` between them, then ``data: [DONE]``, or one JSON answer
  for ``stream: false``. ``GET /health``, ``/metrics`` (the three vLLM gauges the router scrapes) and
  ``/v1/models`` answer too. It models no time, batching or KV transfer: for timed behaviour use
  ``deflectlab emulate``.

Not a general HTTP implementation: no pipelining (one request at a time per connection, as the router's and
this client's pools use them), no compression, no ``Expect: 100-continue``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

_HEAD, _SIZE, _DATA, _TRAILER, _LENGTH, _DONE = range(6)


class HttpError(Exception):
    """A malformed or cut-off HTTP exchange."""


class Response:
    """One HTTP response read incrementally: :meth:`feed` bytes as they come with the time they came.

    :param keep_body: keep the body bytes (else only count them).
    """

    __slots__ = ("keep_body", "buf", "pos", "state", "need", "status", "keep_alive", "body", "body_bytes",
                 "first_at", "end_at")

    def __init__(self, keep_body: bool = False) -> None:
        self.keep_body = keep_body
        self.buf = bytearray()
        self.pos = 0
        self.state = _HEAD
        self.need = 0
        self.status = 0
        self.keep_alive = True
        self.body = bytearray()
        self.body_bytes = 0
        self.first_at = 0.0  # when the first body byte arrived (0: none yet)
        self.end_at = 0.0

    def feed(self, data: bytes, now: float) -> bool:
        """Add ``data`` received at ``now``; True once the response is complete."""
        self.buf += data
        while True:
            state = self.state
            if state == _HEAD:
                if not self._head():
                    return False
            elif state == _SIZE:
                if not self._size():
                    return False
            elif state == _DATA or state == _LENGTH:
                if not self._data(now):
                    return False
            elif state == _TRAILER:
                if not self._trailer():
                    return False
            if self.state == _DONE:
                self.end_at = now
                return True

    def _head(self) -> bool:
        buf = self.buf
        i = buf.find(b"\r\n\r\n", self.pos)
        if i < 0:
            return False
        lines = bytes(buf[self.pos:i]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.keep_alive = parts[0] == b"HTTP/1.1"
        length, chunked = None, False
        for ln in lines[1:]:
            name, _, value = ln.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    raise HttpError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
            elif name == b"connection":
                self.keep_alive = value.lower() == b"keep-alive" or (self.keep_alive and value.lower() != b"close")
        self.pos = i + 4
        if chunked:
            self.state = _SIZE
        elif length is not None:
            self.need = length
            self.state = _LENGTH if length else _DONE
        else:
            raise HttpError("a response without Content-Length or chunked encoding (read to close) is not supported")
        return True

    def _size(self) -> bool:
        buf = self.buf
        i = buf.find(b"\r\n", self.pos)
        if i < 0:
            return False
        line = bytes(buf[self.pos:i]).split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise HttpError(f"bad chunk size line {line[:40]!r}") from None
        self.pos = i + 2
        if self.pos > 65536:  # drop what was read, so a long stream does not keep growing the buffer
            del buf[:self.pos]
            self.pos = 0
        if size == 0:
            self.state = _TRAILER
        else:
            self.need = size
            self.state = _DATA
        return True

    def _data(self, now: float) -> bool:
        """Body bytes of a chunk (``_DATA``, then its CRLF) or of a ``Content-Length`` body (``_LENGTH``)."""
        avail = len(self.buf) - self.pos
        if avail > 0 and not self.first_at:
            self.first_at = now
        tail = 2 if self.state == _DATA else 0
        if avail < self.need + tail:
            return False
        end = self.pos + self.need
        if self.keep_body:
            self.body += self.buf[self.pos:end]
        self.body_bytes += self.need
        if tail and self.buf[end:end + 2] != b"\r\n":
            raise HttpError("a chunk is not followed by CRLF")
        self.pos = end + tail
        self.state = _SIZE if tail else _DONE
        return True

    def _trailer(self) -> bool:
        i = self.buf.find(b"\r\n", self.pos)
        if i < 0:
            return False
        done = i == self.pos
        self.pos = i + 2
        if done:
            self.state = _DONE
        return True


class _ClientConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.fut: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp, fut = self.resp, self.fut
        if resp is None or fut is None:  # bytes nobody asked for: this connection is not reusable
            self.transport.close()  # type: ignore[union-attr]
            return
        try:
            done = resp.feed(data, time.perf_counter())
        except HttpError as e:
            self.resp = self.fut = None
            self.transport.close()  # type: ignore[union-attr]
            if not fut.done():
                fut.set_exception(e)
            return
        if done:
            self.resp = self.fut = None
            if not fut.done():
                fut.set_result(resp)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_exception(HttpError(f"connection closed before the response was complete ({exc!r})"))


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``POST path`` request with a JSON body."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class LeanClient:
    """Keep-alive connections per address; one request at a time on each."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_ClientConn]] = {}
        self._all: list[_ClientConn] = []

    async def request(self, addr: tuple[str, int], data: bytes, keep_body: bool = False) -> Response:
        """Send ``data`` (a whole request, :func:`request_bytes`) to ``addr``; the complete :class:`Response`."""
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(addr, [])
        conn = None
        while idle:
            c = idle.pop()
            if not c.closed:
                conn = c
                break
        if conn is None:
            _, conn = await loop.create_connection(_ClientConn, *addr)
            self._all.append(conn)
        resp = conn.resp = Response(keep_body)
        fut = conn.fut = loop.create_future()
        conn.transport.write(data)  # type: ignore[union-attr]
        try:
            await fut
        except BaseException:
            conn.transport.close()  # type: ignore[union-attr]
            raise
        if resp.keep_alive and not conn.closed:
            idle.append(conn)
        else:
            conn.transport.close()  # type: ignore[union-attr]
        return resp

    def close(self) -> None:
        for c in self._all:
            if c.transport is not None:
                c.transport.close()
        self._all.clear()
        self._idle.clear()


# -- the upstream stand-in -----------------------------------------------------------------------------------
_STATUS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


def _answer(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, _STATUS.get(status, b"Error"), ctype, len(body))) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """The stand-in's state: its role, port, token gap, and the streams it is sending (for ``/metrics``)."""

    def __init__(self, role: str, port: int, token_gap_s: float = 0.0) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        self.role, self.port, self.token_gap_s = role, port, token_gap_s
        self.running = 0
        self.served = 0
        self.handoffs = 0  # decode requests that carried a prefill instance's kv_transfer_params
        self._seq = 0

    def metrics(self) -> bytes:
        return (b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\"} %d\n"
                b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine=\"0\"} 0\n"
                b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.0\n"
                % self.running)

    def completion(self, body: dict[str, Any]) -> tuple[bytes | None, list[bytes]]:
        """A JSON answer (bytes), or None and the SSE events to stream."""
        self._seq += 1
        rid = f"cmpl-lean-{self.port}-{self._seq}"
        if self.role == "prefill":
            kvp_in = body.get("kv_transfer_params")
            out: dict[str, Any] = {"id": rid, "object": "text_completion", "choices": [
                {"index": 0, "text": " t", "logprobs": None, "finish_reason": "length"}]}
            if isinstance(kvp_in, dict) and kvp_in.get("do_remote_decode"):
                out["kv_transfer_params"] = {
                    "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": f"lean-{self.port}",
                    "remote_block_ids": [self._seq], "remote_host": "127.0.0.1", "remote_port": self.port,
                    "tp_size": 1}
            return json.dumps(out, separators=(",", ":")).encode(), []
        kvp_in = body.get("kv_transfer_params")
        if isinstance(kvp_in, dict) and kvp_in.get("do_remote_prefill"):
            self.handoffs += 1
        n = body.get("max_tokens")
        n = n if type(n) is int and n > 0 else 8
        if not body.get("stream"):
            return json.dumps({"id": rid, "object": "text_completion", "choices": [
                {"index": 0, "text": " t" * n, "logprobs": None, "finish_reason": "length"}]},
                separators=(",", ":")).encode(), []
        head = b'data: {"id":"%s","object":"text_completion","choices":[{"index":0,"text":" t","logprobs":null,' \
               b'"finish_reason":' % rid.encode()
        events = [head + b"null}]}\n\n"] * (n - 1) + [head + b'"length"}]}\n\n', b"data: [DONE]\n\n"]
        return None, events


class _ServerConn(asyncio.Protocol):
    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return
        lines = bytes(buf[:i]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._send(_answer(400, b'{"error":"bad request line"}'), close=True)
            return
        length, close = 0, parts[2] != b"HTTP/1.1"
        for ln in lines[1:]:
            name, _, value = ln.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit():
                    self._send(_answer(400, b'{"error":"bad Content-Length"}'), close=True)
                    return
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        if len(buf) < i + 4 + length:
            return
        body = bytes(buf[i + 4:i + 4 + length])
        del buf[:i + 4 + length]
        self._dispatch(parts[0], parts[1].split(b"?", 1)[0], body, close)

    def _dispatch(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        up = self.up
        if method == b"GET":
            if path == b"/health":
                return self._send(_answer(200, b""), close)
            if path == b"/metrics":
                return self._send(_answer(200, up.metrics(), b"text/plain; version=0.0.4"), close)
            if path == b"/v1/models":
                return self._send(_answer(200, b'{"object":"list","data":[{"id":"lean","object":"model"}]}'), close)
        elif method == b"POST" and path in (b"/v1/completions", b"/v1/chat/completions"):
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                return self._send(_answer(400, json.dumps({"object": "error", "message": f"bad JSON: {e}",
                                                           "code": 400}).encode()), close)
            whole, events = up.completion(req)
            up.served += 1
            if whole is not None:
                return self._send(_answer(200, whole), close)
            self.busy = True
            up.running += 1
            asyncio.get_running_loop().create_task(self._stream(events, close))
            return None
        return self._send(_answer(404, b'{"error":"not found"}'), close)

    async def _stream(self, events: list[bytes], close: bool) -> None:
        t = self.transport
        assert t is not None
        try:
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(events[0]))
            for ev in events[1:]:
                await asyncio.sleep(self.up.token_gap_s)
                if t.is_closing():
                    return
                t.write(_chunk(ev))
            t.write(b"0\r\n\r\n")
        finally:
            self.up.running -= 1
            self.busy = False
        if close:
            t.close()
        elif self.buf:
            self._next()

    def _send(self, data: bytes, close: bool) -> None:
        t = self.transport
        assert t is not None
        t.write(data)
        if close:
            t.close()
        elif self.buf:
            self._next()


async def serve_upstream(up: Upstream, host: str = "127.0.0.1", ready: asyncio.Event | None = None) -> None:
    """Serve the stand-in ``up`` on its port until cancelled (``ready`` set once it listens)."""
    server = await asyncio.get_running_loop().create_server(lambda: _ServerConn(up), host, up.port)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["prefill", "decode"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token-gap-ms", type=float, default=0.0,
                    help="wall milliseconds between two streamed events (0: the next loop turn)")
    a = ap.parse_args(argv)
    if a.token_gap_ms < 0:
        raise SystemExit("--token-gap-ms must be >= 0")
    print(f"lean {a.role} stand-in on http://{a.host}:{a.port}", flush=True)
    try:
        asyncio.run(serve_upstream(Upstream(a.role, a.port, a.token_gap_ms / 1e3), a.host))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
