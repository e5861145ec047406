"""What stands between the network and the model: API keys, the Host header, body and concurrency limits.

A pure ASGI layer in front of the app, so that it acts before the body is parsed:
  * Host header: only the names in ``allowed_hosts`` (DNS rebinding against a loopback service);
  * API keys (``Authorization: Bearer <key>`` or ``X-API-Key``) on /v1/* and /v2/models/*, compared in
    constant time (health and server metadata stay open);
    the key's id (a sha256 prefix, never the key) goes to the app as ``scope["svf.owner"]``;
  * the body limit counted while the body streams, chunked or not: past the limit the client gets
    413 and the app a disconnect, so a 400 MiB upload is never read whole;
  * a body that trickles in: it must arrive whole within ``body_timeout`` seconds of the first read
    (408 and the connection closed), so a client sending a byte a second holds no slot for long;
  * at most ``max_inflight`` such requests at once; the next answers 503 with Retry-After instead of
    queueing into timeouts.
Every refusal is ``{"error": ...}`` like the app's own errors.
"""
from __future__ import annotations

import hashlib
import asyncio
import hmac
import json
import logging
import os
from http import HTTPStatus
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_keys(path: str | None = None, env: str = "SVF_FSS_API_KEYS") -> list[str]:
    """Keys from a file (one per line, '#' comments) and/or the environment (comma-separated)."""
    keys = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"API key file {p} does not exist")
        keys += [line.split("#", 1)[0].strip() for line in p.read_text().splitlines()]
    keys += [k.strip() for k in os.environ.get(env, "").split(",")]
    keys = [k for k in keys if k]
    short = [key_id(k) for k in keys if len(k) < 16]
    if short:
        raise ValueError(f"API keys must have at least 16 characters (keys with ids {short} are shorter)")
    return keys


async def _answer(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _text(raw: bytes) -> str:
    """A header's bytes as the client meant them: UTF-8 (a key file's non-ASCII keys), else Latin-1 (HTTP's default)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Guard:
    def __init__(self, app, keys=(), allowed_hosts=("*",), max_body: int = 20 << 20, max_inflight: int = 64,
                 body_timeout: float = 60.0, on_refusal=None):
        self.app, self.max_body, self.max_inflight, self.body_timeout = app, max_body, max_inflight, body_timeout
        self.keys = {key_id(k): k.encode() for k in keys}
        self.hosts = {h.lower() for h in allowed_hosts}
        self.inflight = 0
        self.on_refusal = on_refusal or (lambda scope, status: None)

    def _host_ok(self, headers: dict) -> bool:
        if "*" in self.hosts:
            return True
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in self.hosts or host in self.hosts

    def _owner(self, headers: dict) -> str | None:
        """The id of the presented key, '' when the service is open, None when the key is wrong."""
        if not self.keys:
            return ""
        auth = _text(headers.get(b"authorization", b""))
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else _text(headers.get(b"x-api-key", b"")).strip()
        if not given:
            return None
        kid = key_id(given)
        known = self.keys.get(kid)
        return kid if known is not None and hmac.compare_digest(known, given.encode()) else None

    async def _refuse(self, scope, send, status, message, headers=None):
        self.on_refusal(scope, status)
        await _answer(send, status, message, headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if sum(1 for k, _ in scope.get("headers") or [] if k == b"host") > 1:
            return await self._refuse(scope, send, 400, "more than one Host header")
        if not self._host_ok(headers):
            return await self._refuse(scope, send, 400, "Host header not allowed")
        api = scope["path"].startswith(("/v1/", "/v2/models/"))
        # a browser's CORS preflight never carries the key (the Fetch standard leaves credentials out of it):
        # it passes to the CORS answer, which grants nothing by itself; the request that follows is checked
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if api and not preflight:
            owner = self._owner(headers)
            if owner is None:
                return await self._refuse(scope, send, 401, "a valid API key is required (Authorization: Bearer <key> "
                                                     "or X-API-Key)", {"www-authenticate": "Bearer"})
            scope["svf.owner"] = owner
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await self._refuse(scope, send, 413, f"upload of {int(length)} bytes exceeds the limit of {self.max_body}")
        if api and self.inflight >= self.max_inflight:
            return await self._refuse(scope, send, 503, f"{self.inflight} requests in progress, the limit; retry shortly",
                                      {"retry-after": "1"})
        seen, over, started, body_done, deadline = 0, False, False, False, None

        async def cut(status, message):
            nonlocal over
            over = True
            if not started:               # and close: the server stops reading the rest
                await self._refuse(scope, send, status, message, {"connection": "close"})
            return {"type": "http.disconnect"}

        async def limited_receive():
            nonlocal seen, body_done, deadline
            if over:
                return {"type": "http.disconnect"}
            if body_done:                 # after the body: only a disconnect can come, whenever it comes
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_timeout
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await cut(408, f"the request body did not arrive within {self.body_timeout:g} s")
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    return await cut(413, f"upload exceeds the limit of {self.max_body} bytes")
                body_done = not msg.get("more_body", False)
            return msg

        counted = bool(api)

        def release():
            nonlocal counted
            if counted:
                self.inflight -= 1
                counted = False

        async def guarded_send(msg):
            nonlocal started
            if over:
                return                        # the 413 went out; what the app says after the disconnect does not
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                release()                     # answered: the app's clean-up after it no longer counts

        self.inflight += counted
        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        finally:
            release()


def guarded_protocol(max_connections: int, header_timeout: float, max_header_bytes: int = 32 << 10):
    """uvicorn's httptools protocol (a C parser: 0.66-0.73 ms of the event loop's CPU per registered-set
    request against 0.80-0.96 with h11, and +9% requests per second over three alternating runs on 2
    cores; README, "Figures") with the limits for what never reaches the app:
    * a connection beyond ``max_connections`` open ones is closed at once (file descriptors never run
      out, so the accept loop never fails and floods the log);
    * a connection that has not completed its request line and headers ``header_timeout`` seconds
      after it opened (or after its previous response) is closed: a half-sent request is not kept;
    * a request line and headers over ``max_header_bytes`` answer 431 and close (the parser itself has
      no such cap: a client could grow the header list until memory runs out);
    * a request the parser cannot read answers 400; both in the service's ``{"error": ...}``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadersTooLarge(Exception):
        pass

    class GuardedProtocol(HttpToolsProtocol):
        header_timer = None
        header_bytes = 0
        too_large = False

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections open, the limit is %d: closing the newest", len(self.connections),
                            max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self):
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _disarm(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self):
            self.header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _count(self, n: int):
            self.header_bytes += n
            if self.header_bytes > max_header_bytes:
                self.too_large = True
                raise HeadersTooLarge       # the parser stops; uvicorn answers through send_400_response

        def on_message_begin(self):
            self.header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes):
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes):
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self):
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self):
            queued = bool(self.pipeline)        # a request already read starts now; else wait for the next
            super().on_response_complete()
            if not queued and not self.transport.is_closing():
                self._arm()

        def send_400_response(self, msg: str):
            status, text = (431, f"request line and headers exceed {max_header_bytes} bytes") if self.too_large \
                else (400, "the request is not valid HTTP/1.1")
            body = json.dumps({"error": text}).encode()
            self.transport.write(b"".join([
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode(), b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
            self.transport.close()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol
