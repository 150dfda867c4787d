"""Real object-store servers for the tests: moto's S3 server, the GCS emulator, and a flaky proxy.

Each server runs as a subprocess on 127.0.0.1 with a free port and is stopped afterwards. The
proxy sits in front of one of them, counts requests per path and can fail chosen requests (503,
403, a dropped connection) to exercise retries and error messages.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "moto-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@contextlib.contextmanager
def server(args: list[str], port: int, log: Path) -> Iterator[str]:
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def moto_server(log: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    return server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, log)


def gcs_emulator(log: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    args = [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    return server(args, port, log)


def upload_s3(endpoint: str, bucket: str, root: Path, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_s3_credentials())
    client.create_bucket(Bucket=bucket)
    files = [f for f in sorted(root.rglob("*")) if f.is_file()]
    for f in files:
        client.upload_file(str(f), bucket, f"{prefix}{f.relative_to(root).as_posix()}")
    return len(files)


def delete_s3(endpoint: str, bucket: str, key: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_s3_credentials()).delete_object(Bucket=bucket, Key=key)


def upload_gcs(endpoint: str, bucket: str, root: Path, prefix: str) -> int:
    from google.cloud import storage

    os.environ["STORAGE_EMULATOR_HOST"] = endpoint  # read by the client at construction
    client = storage.Client(project="test")
    target = client.create_bucket(bucket)
    files = [f for f in sorted(root.rglob("*")) if f.is_file()]
    for f in files:
        target.blob(f"{prefix}{f.relative_to(root).as_posix()}").upload_from_filename(str(f))
    return len(files)


def _s3_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


# ---------------------------------------------------------------------------------------------
# The proxy

# A rule sees (method, path, how many times this method+path was seen before) and returns an HTTP
# status to fail with, "drop" to close the connection without answering, or None to forward.
Rule = Callable[[str, str, int], "int | str | None"]


class Proxy:
    def __init__(self, upstream: str, rule: Rule | None = None) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.rule = rule or (lambda method, path, seen: None)
        self.seen: Counter[tuple[str, str]] = Counter()
        self.served: Counter[tuple[str, str]] = Counter()
        self.failed: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Proxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: the test reads the counters
                pass

            def _forward(self) -> None:
                path = self.path.split("?")[0]
                key = (self.command, path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    seen = proxy.seen[key]
                    proxy.seen[key] += 1
                verdict = proxy.rule(self.command, path, seen)
                if verdict == "drop":
                    proxy.failed[key] += 1
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if verdict is not None:
                    proxy.failed[key] += 1
                    message = b"<Error><Code>Injected</Code><Message>injected by the test proxy</Message></Error>"
                    self.send_response(int(verdict))
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()
                if response.status < 300:
                    with proxy._lock:
                        proxy.served[key] += 1

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
