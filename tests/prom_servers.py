"""Real Prometheus and Pushgateway servers (Debian's binaries) on 127.0.0.1 for the monitoring tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from s3_servers import free_port

INSTALL = "sudo apt-get install -y prometheus prometheus-pushgateway"


def binary(name: str) -> str:
    """The server's executable; a missing one FAILS the test (CI must not skip the real-server tests silently)."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed: `{INSTALL}` (Debian/Ubuntu; .ci/run and make test install it)")
    return path


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class _Server:
    """A server process with its log in `workdir`; start() waits for /-/ready, stop() ends it."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.proc = workdir, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        self.log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([binary(self.name), *self.args()], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.logged()}")
            try:
                get(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready on {self.url} after {timeout}s: {self.logged()}")

    def logged(self) -> str:
        return (self.workdir / f"{self.name}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Pushgateway(_Server):
    """prometheus-pushgateway, in memory: Debian's binary persists to /var/lib/prometheus/pushgateway.data by
    default, which would carry groups from one test session into the next (and share them with any other)."""

    name = "prometheus-pushgateway"

    def args(self) -> list[str]:
        return [f"--web.listen-address=127.0.0.1:{self.port}", "--persistence.file=", "--log.level=warn"]

    def groups(self) -> list[dict]:
        """The pushed groups as the Pushgateway's API lists them: [{"labels": {...}, <metric name>: {...}}]."""
        return json.loads(get(f"{self.url}/api/v1/metrics"))["data"]


class Prometheus(_Server):
    """Prometheus scraping every second: job "llm2clip-stage" on 127.0.0.1:`stage_port` (a stage's metrics
    server, when one runs) and job "pushgateway" with honor_labels (pushed job/grouping labels are kept)."""

    name = "prometheus"

    def __init__(self, workdir: Path, stage_port: int, pushgateway: Pushgateway) -> None:
        super().__init__(workdir)
        self.stage_port, self.pushgateway = stage_port, pushgateway

    def args(self) -> list[str]:
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: llm2clip-stage\n    static_configs:\n      - targets: ['127.0.0.1:{self.stage_port}']\n"
            "  - job_name: pushgateway\n    honor_labels: true\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{self.pushgateway.port}']\n"
        )
        return [
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; returns "data", or raises with Prometheus' own error (e.g. a PromQL parse error)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(get(url))
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query: [{"metric": {labels}, "value": [time, "value"]}]."""
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """A range query as Grafana runs a panel's: [{"metric": {labels}, "values": [[time, "value"], ...]}]."""
        return self.api("query_range", query=expr, start=str(start), end=str(end), step=str(step))["result"]

    def wait_for(
        self, expr: str, ok: Callable[[list[dict]], bool], timeout: float, alive: Callable[[], bool] | None = None
    ) -> list[dict]:
        """Query `expr` every 0.25 s until `ok(result)`; `alive()` (optional) must stay true meanwhile."""
        deadline, result = time.time() + timeout, []
        while time.time() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            if alive is not None and not alive():
                raise AssertionError(f"{expr}: the observed process ended first; last result {result}")
            time.sleep(0.25)
        raise AssertionError(f"{expr}: not satisfied after {timeout}s; last result {result}")
