"""A small HTTP proxy that adds latency and faults in front of a real server (tests and benchmarks).

``python -m benchmarks.fault_proxy --upstream 127.0.0.1:PORT --port P [--delay-ms 50]`` forwards every
request to the upstream server (moto's S3 server, a Range-capable HTTP server) unchanged, Host header
and signature included, and sends the response back. Faults are rules posted as JSON to
``/__proxy__/rules``; each matching request consumes one use of the first rule that matches:

- ``{"action": "status", "status": 503, "count": 2}``: answer 503 (S3's SlowDown body) instead.
- ``{"action": "short", "keep": 100}``: send only the first ``keep`` bytes, with a Content-Length that
  says so (a well-formed response that is shorter than the range asked).
- ``{"action": "cut", "keep": 100}``: announce the whole length, send ``keep`` bytes, drop the connection.
- ``{"action": "reset"}``: drop the connection without answering.
- ``{"action": "delay", "delay_ms": 2000}``: answer late (past a client's read timeout).
Matching: ``path`` (a substring of the request path), ``range_start`` (the first byte of the Range
header), ``method``; ``count`` -1 = forever. ``DELETE /__proxy__/rules`` clears them,
``GET /__proxy__/stats`` returns the requests forwarded and the body bytes sent.
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import json
import re
import socket
import threading
import time

_RANGE = re.compile(r"bytes=(\d+)-")
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
              b'<Message>Please reduce your request rate.</Message></Error>')
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade"}


class ProxyState:
    def __init__(self, upstream: str, delay_ms: float):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.delay_s = delay_ms / 1000.0
        self.rules: list[dict] = []
        self.requests = 0
        self.bytes = 0
        self.faults = 0
        self.lock = threading.Lock()

    def take_rule(self, method: str, path: str, headers) -> dict | None:
        match = _RANGE.match(headers.get("Range", ""))
        start = int(match.group(1)) if match else None
        with self.lock:
            for rule in self.rules:
                if rule.get("count", 1) == 0:
                    continue
                if "path" in rule and rule["path"] not in path:
                    continue
                if "range_start" in rule and rule["range_start"] != start:
                    continue
                if "method" in rule and rule["method"] != method:
                    continue
                if rule.get("count", 1) > 0:
                    rule["count"] = rule.get("count", 1) - 1
                self.faults += 1
                return dict(rule)
        return None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProxyState

    def log_message(self, *args) -> None:  # quiet: tests read the stats instead
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _control(self) -> None:
        st = self.state
        body = self._body()
        if self.command == "POST":
            with st.lock:
                rule = json.loads(body)
                if rule.get("action") == "latency":
                    st.delay_s = float(rule["delay_ms"]) / 1000.0
                else:
                    st.rules.append(rule)
        elif self.command == "DELETE":
            with st.lock:
                st.rules.clear()
        with st.lock:
            stats = {"requests": st.requests, "bytes": st.bytes, "faults": st.faults,
                     "rules": st.rules, "delay_ms": st.delay_s * 1000}
        self._reply(200, json.dumps(stats).encode(), {"Content-Type": "application/json"})

    def _handle(self) -> None:
        if self.path.startswith("/__proxy__/"):
            return self._control()
        st = self.state
        body = self._body()
        rule = st.take_rule(self.command, self.path, self.headers)
        if st.delay_s:
            time.sleep(st.delay_s)
        action = rule.get("action") if rule else None
        if action == "reset":
            self._drop()
            return
        if action == "status":
            status = int(rule.get("status", 503))
            self._reply(status, _SLOW_DOWN if status == 503 else b"", {"Content-Type": "application/xml"})
            return
        if action == "delay":
            time.sleep(float(rule.get("delay_ms", 1000)) / 1000.0)
        status, reason, headers, payload = self._forward(body)
        if status is None:   # upstream down: a gateway error, as a real load balancer answers
            self._reply(502, b"upstream unreachable")
            return
        with st.lock:
            st.requests += 1
        keep = int(rule.get("keep", 0)) if rule else 0
        if action == "short":
            payload = payload[:keep]
        self.send_response(status, reason)
        length = str(len(payload))
        for k, v in headers:
            if k.lower() == "content-length" and self.command == "HEAD":
                length = v  # a HEAD answer has no body: its Content-Length is the object's size (S3 HeadObject)
            elif k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return
        if action == "cut":
            self.wfile.write(payload[:keep])
            self.wfile.flush()
            self._drop()
            return
        self.wfile.write(payload)
        with st.lock:
            st.bytes += len(payload)

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.state.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        except OSError:
            return None, None, None, None
        finally:
            conn.close()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="host:port of the real server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="latency added to every request")
    args = p.parse_args(argv)
    Handler.state = ProxyState(args.upstream, args.delay_ms)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
