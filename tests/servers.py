"""Real servers on 127.0.0.1 for the storage tests, started and stopped by the tests themselves: moto's S3
server in a subprocess, and Python's http.server in a thread with injectable faults. Nothing listens beyond
loopback, and both stop at the end of their `with` block."""

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the test process dies, even killed, so no server is left over."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def s3_env(port: int) -> dict:
    """Test credentials and a loopback endpoint: nothing probes beyond 127.0.0.1 (no instance metadata)."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextlib.contextmanager
def moto_s3():
    """moto_server on a free loopback port; yields the environment a client needs."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield s3_env(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Faults:
    """What the HTTP server does wrong: per path prefix, fail the first N requests (503), deny (403), send
    slowly, or flip one byte of the body."""

    def __init__(self):
        self.fail_first: dict[str, int] = {}
        self.always_fail: set[str] = set()
        self.deny: set[str] = set()
        self.slow: dict[str, float] = {}  # seconds per 64 KiB
        self.flip: set[str] = set()
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()


class _Handler(http.server.SimpleHTTPRequestHandler):
    faults: Faults

    def log_message(self, *args):
        pass

    def _match(self, rules) -> str | None:
        return next((p for p in rules if self.path.startswith(p)), None)

    def do_GET(self):
        f = self.faults
        with f.lock:
            f.requests[self.path] = f.requests.get(self.path, 0) + 1
            n = f.requests[self.path]
        if self._match(f.deny):
            return self.send_error(403)
        if self._match(f.always_fail):
            return self.send_error(503)
        prefix = self._match(f.fail_first)
        if prefix and n <= f.fail_first[prefix]:
            return self.send_error(503)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        data = bytearray(path.read_bytes())
        if self._match(f.flip) and data:
            data[len(data) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        delay = f.slow.get(self._match(f.slow) or "", 0)
        for i in range(0, len(data), 1 << 16):
            try:
                self.wfile.write(data[i:i + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                return
            if delay:
                time.sleep(delay)

    def do_HEAD(self):
        if self._match(self.faults.deny):
            return self.send_error(403)
        super().do_HEAD()


@contextlib.contextmanager
def http_files(directory: Path):
    """A threaded HTTP server on a free loopback port serving `directory`; yields (base URL, Faults)."""
    faults = Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(handler, directory=str(directory)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", faults
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
