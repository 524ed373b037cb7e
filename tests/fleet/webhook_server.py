"""A real HTTP server that receives alert webhooks (tests): records every POST, answers with scripted statuses."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookServer:
    """``statuses``: what the first requests get (then 200). ``received``: (status sent back, JSON body)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.cond:
                    status = owner.statuses.pop(0) if owner.statuses else 200
                    owner.received.append((status, body))
                    owner.headers.append(dict(self.headers))
                    owner.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The successfully answered bodies, once ``n`` of them arrived (raises after ``timeout``)."""
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(1 for s, _ in self.received if s < 300) >= n, timeout)
            assert ok, f"webhook got {self.received}"
            return [b for s, b in self.received if s < 300]
