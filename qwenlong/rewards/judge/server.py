"""A minimal OpenAI-compatible chat server around a reply function (``qwenlong serve-judge``).

``POST /v1/chat/completions`` calls ``reply(messages, params) -> str`` and returns the OpenAI
response shape; ``GET /v1/models`` lists the one model. Built on the standard library's threading
HTTP server: enough for a judge (one small model), no extra dependency. Binds to loopback unless
told otherwise. It is meant to face untrusted clients:

* an optional API key (``Authorization: Bearer KEY``, compared in constant time);
* ``Content-Length`` is required, a plain decimal, at most ``max_request_bytes``; the request line
  and headers, and then the body, must each arrive within ``read_timeout`` seconds in total (not
  per read: a client dripping a byte a second cannot hold a thread);
* the messages hold at most ``max_prompt_chars`` characters, and the request's ``max_tokens`` is
  capped at ``max_tokens``;
* a reply function with a ``cancel`` parameter gets a ``threading.Event`` set when the client
  disconnects, so generation can stop;
* every error is a JSON body ``{"error": {"message", "type", "code"}}`` with a fixed message (no
  exception text or repr reaches the client; the server logs the exception's type).
"""

from __future__ import annotations

import argparse
import hmac
import inspect
import json
import os
import re
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ReplyFn = Callable[..., str]  # (messages, params) or (messages, params, cancel=threading.Event)
_DECIMAL = re.compile(r"[0-9]{1,20}")


class _RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _watch_disconnect(sock: socket.socket, cancel: threading.Event, done: threading.Event) -> None:
    """Set ``cancel`` when the peer closes ``sock`` (readable with nothing to read), until ``done``."""
    while not done.is_set():
        try:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and not sock.recv(1, socket.MSG_PEEK):
                cancel.set()
                return
        except (OSError, ValueError):  # the socket is gone
            cancel.set()
            return
        if readable:  # the client sent more (a pipelined request): keep the reply, stop polling
            return


class ChatServer:
    """Serve ``reply`` at ``http://host:port/v1``; use as a context manager or start()/stop()."""

    def __init__(self, reply: ReplyFn, *, model: str = "judge", host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, max_tokens: int | None = None, max_request_bytes: int = 1 << 20,
                 max_prompt_chars: int = 200_000, read_timeout: float = 30.0):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1 or None, got {max_tokens}")
        if max_request_bytes < 1 or max_prompt_chars < 1 or not read_timeout > 0:
            raise ValueError("max_request_bytes, max_prompt_chars and read_timeout: must be positive, got "
                             f"{max_request_bytes}, {max_prompt_chars}, {read_timeout}")
        self.reply = reply
        self.model = model
        self.api_key = api_key or None
        self.max_tokens = max_tokens
        self.max_request_bytes = max_request_bytes
        self.max_prompt_chars = max_prompt_chars
        self.read_timeout = read_timeout
        try:
            self._takes_cancel = "cancel" in inspect.signature(reply).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self._takes_cancel = False
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _params(self, body: bytes) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """The request's messages and parameters, checked (``_RequestError`` otherwise)."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            raise _RequestError(400, "body: not valid JSON") from None
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise _RequestError(400, "messages: expected a non-empty list of {role, content} objects with text content")
        size = sum(len(m["content"]) for m in messages)
        if size > self.max_prompt_chars:
            raise _RequestError(413, f"messages: {size} characters, over this server's limit of "
                                     f"{self.max_prompt_chars}")
        params = dict(request)
        max_tokens = params.get("max_tokens")
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise _RequestError(400, "max_tokens: expected a positive integer")
            if self.max_tokens is not None:
                params["max_tokens"] = min(max_tokens, self.max_tokens)
        elif self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        return [{"role": m["role"], "content": m["content"]} for m in messages], params

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: avoid the 40 ms ACK stall
            timeout = server.read_timeout  # per read of the request line and headers

            def log_message(self, format, *args):  # quiet: a judge serves many requests
                pass

            def handle_one_request(self):
                # the request line and headers must arrive within read_timeout in total: past it, the
                # socket's reading side is shut, so the pending read returns at once, and the client gets a 408
                self._headers_late = False
                self._header_timer = threading.Timer(server.read_timeout, self._give_up_reading)
                self._header_timer.daemon = True
                self._header_timer.start()
                try:
                    super().handle_one_request()
                finally:
                    self._header_timer.cancel()

            def _give_up_reading(self):
                self._headers_late = True
                try:
                    self.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

            def parse_request(self):
                ok = super().parse_request()
                self._header_timer.cancel()
                if ok and self._headers_late:
                    late = f"the request headers did not arrive within {server.read_timeout} s"
                    self._error(_RequestError(408, late), close=True)
                    return False
                return ok

            def _send(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
                body = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    if close:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    if status == 401:
                        self.send_header("WWW-Authenticate", "Bearer")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client went away
                    self.close_connection = True

            def _error(self, error: _RequestError, close: bool = False) -> None:
                self._send(error.status, {"error": {"message": error.message, "type": error.kind,
                                                    "code": error.status}}, close)

            def send_error(self, code, message=None, explain=None):  # the base class's HTML errors, as JSON
                self._error(_RequestError(int(code), message or "bad request"), close=True)

            def _authorized(self) -> bool:
                if server.api_key is None:
                    return True
                given = self.headers.get("Authorization", "")
                expected = f"Bearer {server.api_key}"
                if hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
                    return True
                self._error(_RequestError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                          "authentication_error"))
                return False

            def _read_body(self) -> bytes:
                raw = self.headers.get("Content-Length")
                if raw is None:
                    raise _RequestError(411, "Content-Length: required")
                if not _DECIMAL.fullmatch(raw.strip()):
                    raise _RequestError(400, "Content-Length: expected a non-negative decimal integer")
                length = int(raw.strip())
                if length > server.max_request_bytes:
                    raise _RequestError(413, f"Content-Length: {length} bytes, over this server's limit of "
                                             f"{server.max_request_bytes}")
                deadline = time.monotonic() + server.read_timeout
                late = _RequestError(408, f"the request body did not arrive within {server.read_timeout} s")
                data = bytearray()
                while len(data) < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise late
                    self.connection.settimeout(left)
                    try:
                        chunk = self.rfile.read1(min(length - len(data), 1 << 16))
                    except TimeoutError:  # the socket is unusable after a timeout: answer and close
                        raise late from None
                    if not chunk:
                        raise _RequestError(400, "the request body ended early")
                    data += chunk
                self.connection.settimeout(server.read_timeout)
                return bytes(data)

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._error(_RequestError(404, "no such route"))

            def do_POST(self):
                try:
                    if not self._authorized():
                        self.close_connection = True  # the body was not read
                        return
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        raise _RequestError(404, "no such route")
                    messages, params = server._params(self._read_body())
                except _RequestError as e:
                    self._error(e, close=True)
                    return
                cancel, done = threading.Event(), threading.Event()
                threading.Thread(target=_watch_disconnect, args=(self.connection, cancel, done), daemon=True,
                                 name="qwenlong-chat-watch").start()
                try:
                    extra = {"cancel": cancel} if server._takes_cancel else {}
                    content = server.reply(messages, params, **extra)
                    if not isinstance(content, str):
                        raise TypeError(f"reply returned {type(content).__name__}, not text")
                except Exception as e:  # reported to the client without details, the server keeps serving
                    print(f"qwenlong serve-judge: reply failed ({type(e).__name__})", file=sys.stderr, flush=True)
                    self._error(_RequestError(500, "the model failed to reply", "server_error"))
                    return
                finally:
                    done.set()
                if cancel.is_set():  # nobody is listening
                    self.close_connection = True
                    return
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": server.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                })

        return Handler

    def start(self) -> ChatServer:
        # a short poll interval so stop() returns quickly
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="qwenlong-chat-server",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the `qwenlong serve-judge` subcommand ----------------------------------------------------

API_KEY_ENV = "QWENLONG_JUDGE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="path of a local HF chat model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="tokens generated per reply; a request's max_tokens is capped at this")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set, else none)")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body accepted")
    parser.add_argument("--max-prompt-chars", type=int, default=200_000,
                        help="most characters of message text per request")
    parser.add_argument("--max-prompt-tokens", type=int, default=8192, help="most prompt tokens per request")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client has to send its headers and, in total, its body")


def run(args: argparse.Namespace) -> int:
    from qwenlong.rewards.judge.local_hf import LocalHFJudge

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    judge = LocalHFJudge.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens,
                                         max_prompt_tokens=args.max_prompt_tokens)

    def reply(messages, params, cancel):
        return judge.generate(messages, max_new_tokens=params.get("max_tokens"), stop=cancel)

    server = ChatServer(reply, model=args.model, host=args.host, port=args.port, api_key=api_key,
                        max_tokens=args.max_new_tokens, max_request_bytes=args.max_request_bytes,
                        max_prompt_chars=args.max_prompt_chars, read_timeout=args.read_timeout)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    print(f"serving {args.model} at {server.url}/chat/completions", flush=True)
    server.serve_forever()
    return 0
