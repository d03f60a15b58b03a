"""A Hugging Face hub on 127.0.0.1 for the download tests: huggingface_hub itself runs against it (point
HF_ENDPOINT at `hub.url`), so the tests exercise the real client: its metadata request, its streamed
download into the cache, its retries and its errors.

It answers what `hf_hub_download` asks, `HEAD` and `GET /{repo}/resolve/{revision}/{filename}` (Range
requests included), with the headers the real hub sends for a plain (non-LFS) file: X-Repo-Commit, ETag,
Content-Length. `mode` says how it behaves:
    "ok"     the file
    "break"  every GET sends the first half of what it was asked for, then closes the connection
    "stall"  the first GET sends the first half, then waits until `release()` (never answers more)
A file it does not hold is a 404 with the hub's X-Error-Code "EntryNotFound".
"""
from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class LocalHub:
    def __init__(self, files: dict[str, bytes], mode: str = "ok"):
        """files: {"owner/name/filename": bytes}."""
        self.files, self.mode = files, mode
        self.requests: list[tuple[str, str]] = []        # (method, path)
        self.half_sent = threading.Event()
        self._released = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):       # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def release(self) -> None:
        self._released.set()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", h.path.split("?")[0])
        data = self.files.get(f"{m.group(1)}/{m.group(3)}") if m else None
        if data is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("X-Error-Message", "Entry not found")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if body and rng:
            start = int(rng.group(1))
        part = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(part)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if not body:
            return
        if self.mode == "ok":
            h.wfile.write(part)
            return
        h.wfile.write(part[:len(part) // 2])
        h.wfile.flush()
        self.half_sent.set()
        if self.mode == "stall":
            self._released.wait(600)
        h.close_connection = True
