"""A minimal OpenAI-compatible chat server around a reply function (``qwenlong serve-judge``).

``POST /v1/chat/completions`` calls ``reply(messages, params) -> str`` and returns the
OpenAI response shape; ``GET /v1/models`` lists the one model. An exception in ``reply``
becomes HTTP 500. Built on the standard library's threading HTTP server: enough for a judge
(one small model), no extra dependency. Binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ReplyFn = Callable[[list[dict[str, str]], dict[str, Any]], str]


class ChatServer:
    """Serve ``reply`` at ``http://host:port/v1``; use as a context manager or start()/stop()."""

    def __init__(self, reply: ReplyFn, *, model: str = "judge", host: str = "127.0.0.1", port: int = 0):
        self.reply = reply
        self.model = model
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: avoid the 40 ms ACK stall

            def log_message(self, format, *args):  # quiet: a judge serves many requests
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    messages = request["messages"]
                except (ValueError, KeyError, TypeError) as e:
                    self._send(400, {"error": {"message": f"bad request: {e}"}})
                    return
                try:
                    content = server.reply(messages, request)
                except Exception as e:  # reported to the client, the server keeps serving
                    self._send(500, {"error": {"message": repr(e)}})
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

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="path of a local HF chat model")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=512)


def run(args: argparse.Namespace) -> int:
    from qwenlong.rewards.judge.local_hf import LocalHFJudge

    judge = LocalHFJudge.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens)

    def reply(messages, params):
        return judge.generate(messages, max_new_tokens=params.get("max_tokens") or args.max_new_tokens)

    server = ChatServer(reply, model=args.model, host=args.host, port=args.port)
    print(f"serving {args.model} at {server.url}/chat/completions", flush=True)
    server.serve_forever()
    return 0
