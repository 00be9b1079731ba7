"""llm2clip.storage against a real S3-protocol server (moto; nanio where credentials must be refused)."""

import contextlib
import http.client
import http.server
import os
import threading
import time

import pytest

from llm2clip import data, prepare_data, storage


def test_round_trip_list_exists_delete(s3_env):
    a, b = storage.join(s3_env, "d", "a.bin"), storage.join(s3_env, "d", "sub", "b.json")
    storage.write_bytes(a, b"hello")
    storage.write_json(b, {"x": 1})
    assert storage.read_bytes(a) == b"hello" and storage.read_json(b) == {"x": 1}
    assert storage.exists(a) and storage.exists(storage.join(s3_env, "d"))
    assert not storage.exists(storage.join(s3_env, "nope"))
    assert storage.list_files(storage.join(s3_env, "d")) == [a]
    assert storage.list_files(storage.join(s3_env, "d"), recursive=True) == [a, b]
    storage.delete(storage.join(s3_env, "d"))
    assert storage.list_files(storage.join(s3_env, "d"), recursive=True) == []


def test_multipart_upload_and_streaming_read(s3_env):
    payload = bytes(range(256)) * (storage.PART_SIZE // 256 + 4097)  # > one part: multipart upload
    uri = storage.join(s3_env, "big.bin")
    with storage.open_write(uri) as f:
        f.write(payload)
    with storage.open_read(uri) as f:
        assert f.read(10) == payload[:10]
        assert f.read() == payload[10:]


def test_failed_write_leaves_nothing_visible(s3_env, tmp_path):
    for base in (s3_env, str(tmp_path)):
        uri = storage.join(base, "partial.bin")
        with pytest.raises(RuntimeError), storage.open_write(uri) as f:
            f.write(b"half of it")
            raise RuntimeError("killed mid-write")
        assert not storage.exists(uri)
        assert storage.list_files(base) == []


def test_upload_survives_a_server_restart(s3_env, moto_server, monkeypatch):
    """The server goes away; the write retries with backoff and lands complete once it is back."""
    monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "6")
    uri = storage.join(s3_env, "during-restart.bin")
    payload = b"x" * 100_000
    moto_server.stop()
    restart = threading.Timer(1.5, moto_server.start)
    restart.start()
    try:
        storage.write_bytes(uri, payload)
    finally:
        restart.join()
    assert storage.read_bytes(uri) == payload


def test_unreachable_endpoint_fails_after_retries(monkeypatch, s3_env):
    from s3_servers import free_port

    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "1")
    with pytest.raises(ConnectionError, match="unreachable after 2 attempts"):
        storage.read_bytes(storage.join(s3_env, "x"))


def test_wrong_credentials_fail_fast_and_clearly(tmp_path, monkeypatch):
    from s3_servers import nanio

    with nanio(tmp_path, "right-key", "right-secret-value") as port:
        monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "right-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "right-secret-value")
        from s3_servers import make_bucket

        make_bucket("data")
        storage.write_bytes("s3://data/ok.txt", b"ok")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        t0 = time.time()
        with pytest.raises(PermissionError) as err:
            storage.read_bytes("s3://data/ok.txt")
        assert time.time() - t0 < 5  # not retried
        msg = str(err.value)
        assert f"127.0.0.1:{port}" in msg and "bucket 'data'" in msg
        assert "wrong-secret-value" not in msg and "right-key" not in msg


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_settings_repr_hides_secrets(s3_env):
    assert "testing-secret" not in repr(storage.S3Settings.from_env())


def test_prepared_shards_stream_from_s3(s3_env):
    out = storage.join(s3_env, "prepared")
    prepare_data.prepare_data(prepare_data.PrepareDataConfig(num_train=10, num_eval=4, shard_size=4), out)
    shards = storage.list_files(storage.join(out, "train"), ".tar")
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    keys = [r["key"] for r in data.read_split(storage.join(out, "train"))]
    assert len(keys) == 10 and len(set(keys)) == 10
    assert storage.read_json(storage.join(out, "manifest.json"))["stage"] == "prepare_data"


def test_a_server_that_never_answers_fails_as_a_timeout(monkeypatch, s3_env):
    """A socket that accepts connections and never answers: TimeoutError naming the limit, in seconds not minutes."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept_forever, daemon=True).start()
    port = server.getsockname()[1]
    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("LLM2CLIP_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("LLM2CLIP_S3_RETRIES", "5")
    t0 = time.time()
    try:
        with pytest.raises(TimeoutError) as err:
            storage.read_bytes(storage.join(s3_env, "x"))
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    elapsed = time.time() - t0
    assert elapsed < 5, elapsed  # two 1 s read timeouts and one 0.5 s backoff, not six of each
    assert str(err.value) == (
        f"read {s3_env}/x: timeout: 127.0.0.1:{port} did not answer within the read timeout of 1 s "
        "(LLM2CLIP_S3_READ_TIMEOUT), 2 times in 2 attempts"
    )


def test_timeout_settings_come_from_the_environment(monkeypatch, s3_env):
    monkeypatch.setenv("LLM2CLIP_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("LLM2CLIP_S3_READ_TIMEOUT", "7")
    settings = storage.S3Settings.from_env()
    assert (settings.connect_timeout_s, settings.read_timeout_s) == (2.5, 7.0)
    monkeypatch.setenv("LLM2CLIP_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LLM2CLIP_S3_READ_TIMEOUT='soon': expected a float"):
        storage.S3Settings.from_env()


# ----------------------------------------------------------------------------------------------- faults


class FaultProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy in front of moto that answers the next object requests (`plan`: (method, fault) pairs, used
    in order) with a fault: "slowdown" (503 SlowDown), "request-timeout" (400 RequestTimeout: S3's code for a
    client that sent too slowly, which is worth retrying although the status says client error), "truncate" (the
    headers and half the body, then the connection closes) or "reset" (the connection closes, nothing sent)."""

    daemon_threads = True

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.plan = upstream_port, []
        super().__init__(("127.0.0.1", 0), _FaultHandler)


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        plan = self.server.plan
        fault = plan.pop(0)[1] if plan and plan[0][0] == self.command and "?" not in self.path else None
        if fault in ("slowdown", "request-timeout"):
            status, code = (503, "SlowDown") if fault == "slowdown" else (400, "RequestTimeout")
            xml = f"<Error><Code>{code}</Code><Message>{fault}</Message><Resource>{self.path}</Resource></Error>"
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml.encode())
            return
        if fault == "reset":
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = upstream.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if fault == "truncate" else data)
        self.close_connection = fault == "truncate"

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.mark.parametrize(
    ("fault", "method", "operation"),
    [
        ("truncate", "GET", "read_bytes"),
        ("truncate", "GET", "open_read"),
        ("request-timeout", "GET", "read_bytes"),
        ("slowdown", "GET", "read_bytes"),
        ("slowdown", "PUT", "write_bytes"),
        ("reset", "GET", "read_bytes"),
        ("reset", "PUT", "write_bytes"),
    ],
)
def test_transient_faults_are_retried(s3_env, moto_server, monkeypatch, fault, method, operation):
    """Each fault once, then the call succeeds with the right bytes. The first three are why storage keeps its own
    retry loop instead of urllib3.Retry: a truncated body fails in the read after urlopen has returned (minio
    streams objects with preload_content=False), where urllib3's retries no longer apply, and a retry by status
    cannot tell a 400 RequestTimeout from a 400 that will fail again (measured: the urllib3.Retry variant fails
    these three and passes the other four)."""
    uri, payload = storage.join(s3_env, "faults.bin"), bytes(range(256)) * 800
    storage.write_bytes(uri, payload)
    proxy = FaultProxy(moto_server.port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("MINIO_ENDPOINT", f"127.0.0.1:{proxy.server_address[1]}")
    proxy.plan.append((method, fault))
    try:
        if operation == "read_bytes":
            assert storage.read_bytes(uri) == payload
        elif operation == "open_read":
            with storage.open_read(uri) as f:
                assert f.read() == payload
        else:
            storage.write_bytes(uri, payload[::-1])
            assert storage.read_bytes(uri) == payload[::-1]
        assert proxy.plan == []  # the fault was served
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_local_write_gets_the_mode_open_would_give(tmp_path):
    """The atomic write goes through mkstemp (0600): the final file must be readable as open() would make it
    (report.html and the artifacts were 0600, unreadable to a web server or another user sharing the run dir)."""
    old = os.umask(0o022)
    try:
        storage.write_bytes(tmp_path / "report.html", b"<html></html>")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
