"""A webhook receiver on loopback for black-box tests: a real HTTP server in a thread that
answers each POST with the next scripted status and keeps what it got (headers and body)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    def __init__(self, statuses: list[int] | None = None) -> None:
        # Answered in order; once used up, every further request gets 200.
        self.statuses = list(statuses or [])
        self.received: list[Received] = []
        # When set to an event, the first request is recorded but not answered until it is set
        # (a try in flight when the sender dies).
        self.hold_first: threading.Event | None = None
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._changed:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(headers, body, status))
                    first = len(receiver.received) == 1
                    receiver._changed.notify_all()
                if first and receiver.hold_first is not None:
                    receiver.hold_first.wait(60)
                self.send_response(status)
                answer = b"receiver says no" if status >= 300 else b"ok"
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The first ``count`` requests, once they have arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"{len(self.received)} webhook requests, not {count}")
            return self.received[:count]

    def close(self) -> None:
        if self.hold_first is not None:
            self.hold_first.set()
        self._server.shutdown()
        self._server.server_close()
