"""An HTTP proxy in front of the moto server that injects object-store faults, for tests: every
``every``-th request gets a 503 SlowDown (S3's throttling answer) or, alternately, has its
connection reset before any answer; ``deny=True`` answers every request 403 AccessDenied;
``hold_parts=True`` holds every multipart part upload (a writer killed mid-upload). All other
requests are forwarded unchanged and their answers passed back."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, every: int = 0, deny: bool = False, hold_parts: bool = False) -> None:
        self.upstream = urlsplit(upstream)
        self.every, self.deny, self.hold_parts = every, deny, hold_parts
        self.part_seen = threading.Event()  # set when a multipart part arrives (hold_parts: and is held)
        self.requests = self.throttled = self.resets = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: failures print the test's own output
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and "partNumber=" in self.path:
                    proxy.part_seen.set()
                    if proxy.hold_parts:  # the uploader is killed meanwhile
                        threading.Event().wait(30)
                fault = proxy._fault()
                if fault == "reset":  # RST instead of an answer, as a dropped connection
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in ("slowdown", "deny"):
                    self._answer(503 if fault == "slowdown" else 403, {"Content-Type": "application/xml"},
                                 _SLOWDOWN if fault == "slowdown" else _DENIED)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self._answer(answer.status, {k: v for k, v in answer.getheaders()
                                             if k.lower() not in _HOP and k.lower() != "content-length"}, data, length)

            def _answer(self, status: int, headers: dict, data: bytes, length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.deny:
                return "deny"
            if not self.every or self.requests % self.every:
                return None
            if (self.requests // self.every) % 2:
                self.throttled += 1
                return "slowdown"
            self.resets += 1
            return "reset"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
