"""uvicorn's httptools protocol, answering requests it cannot parse the way the service answers
every other client mistake: a JSON error, never uvicorn's ``text/plain`` one.

Requests that never reach the application — broken request lines, unknown methods, bytes that
are not HTTP, raw non-ASCII in the target, unsupported HTTP versions, an over-long head — are
rejected by the parser (llhttp, via httptools: the fast C parser uvicorn ships with).  uvicorn
answers those through ``send_400_response`` from inside its ``except HttpParserError`` block;
this subclass overrides only that method and picks the status from the active exception:

* **405** for a well-formed request line with a method llhttp does not know (``BREW /x
  HTTP/1.1``); **400** when the bytes are not a request line at all (``NONSENSE``, TLS);
* **431** when the request line plus headers exceed ``MAX_HEAD_BYTES`` (counted while parsing,
  so a client cannot make the server buffer an unbounded head);
* **400** for everything else, with llhttp's reason ("Invalid char in url query").

``on_reject(status, client)`` lets the service count these in its metrics and access log.

**One write per response.**  uvicorn writes a response's head when the application sends
``http.response.start`` and its body at ``http.response.body``: two ``send`` system calls and
two TCP segments per answer, each waking the client.  The protocol hands uvicorn a transport
(:class:`CoalescedWrites`) that gathers the writes of one event-loop step and writes them at
the end of it, so a head and a body sent back to back leave as one.

``HttpToolsProtocol`` is private to uvicorn, so ``pyproject.toml`` pins uvicorn to the minor
version these hooks were written against (0.55) and ``tests/test_serve_admission.py`` fails if
an upgrade renames or reshapes one of them.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 16 << 10  # request line + headers (431 above)
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/\d\.\d\r?\n")


class CoalescedWrites:
    """A transport whose writes within one event-loop step go out as one write.

    Everything but ``write`` and ``close`` is the wrapped transport's own (flow control,
    ``get_extra_info``, ``is_closing``).  Pending bytes are written before a close, and dropped
    when the connection is already closing (the peer is gone)."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class HeadTooLarge(Exception):
    """Raised from a parser callback when the request head passes ``MAX_HEAD_BYTES``."""


def _status_and_message(exc: BaseException | None, data: bytes) -> tuple[int, str]:
    if isinstance(exc, httptools.HttpParserCallbackError) and isinstance(
            exc.__context__, HeadTooLarge):
        return 431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes"
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        if _REQUEST_LINE.match(data):
            method = data.split(b" ", 1)[0].decode("latin-1")
            return 405, f"method {method!r} is not allowed; use GET"
        return 400, "malformed HTTP request: not an HTTP/1.x request line"
    reason = str(exc) if isinstance(exc, httptools.HttpParserError) and str(exc) else "bad syntax"
    return 400, f"malformed HTTP request: {reason}"


def make_protocol(on_reject: Callable[[int, tuple[str, int] | None], None] | None = None,
                  max_head_bytes: int = MAX_HEAD_BYTES) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to a rejection observer."""

    class JsonErrorProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _data = b""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescedWrites(transport, self.loop))

        def data_received(self, data: bytes) -> None:
            self._data = data  # the bytes being parsed, to tell a bad method from noise
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            super().on_message_begin()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > max_head_bytes:
                raise HeadTooLarge()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def send_400_response(self, msg: str) -> None:
            status, message = _status_and_message(sys.exc_info()[1], self._data)
            body = json.dumps({"error": message, "status": status}).encode()
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
            for name, value in self.server_state.default_headers:
                head.append(name + b": " + value + b"\r\n")
            head.append(b"content-type: application/json; charset=utf-8\r\n"
                        b"content-length: %d\r\ncache-control: no-store\r\n"
                        b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
                        % len(body))
            self.transport.write(b"".join(head) + body)
            self.transport.close()
            if on_reject is not None:
                on_reject(status, self.client)

    return JsonErrorProtocol


_REASONS = {400: b"Bad Request", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large"}
