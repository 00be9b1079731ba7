"""Real S3-protocol servers on 127.0.0.1 for the tests: moto (any credentials) and nanio (checks credentials)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no server on 127.0.0.1:{port} after {timeout}s")


class Moto:
    """moto's S3 in a thread of this process; stop() and start() keep its buckets (state is in-process)."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> None:
        self.server.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self.server.stop()

    @property
    def env(self) -> dict[str, str]:
        return {
            "MINIO_ENDPOINT": f"127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_REGION": "us-east-1",
        }


@contextlib.contextmanager
def nanio(data_dir: Path, access_key: str, secret_key: str) -> Iterator[int]:
    """A nanio server that only accepts the given credentials; yields its port."""
    port = free_port()
    env = {**os.environ, "NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key}
    exe = Path(sys.executable).parent / "nanio"
    cmd = [
        str(exe),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_bucket(bucket: str) -> None:
    from minio import Minio

    c = Minio(
        os.environ["MINIO_ENDPOINT"],
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=False,
        region=os.environ.get("AWS_REGION"),
    )
    if not c.bucket_exists(bucket):
        c.make_bucket(bucket)
