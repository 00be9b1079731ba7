"""llm2clip.monitoring against the real Prometheus and Pushgateway (Debian's binaries on 127.0.0.1): a running
stage is scraped, pushed summaries are queryable and equal the stages' own counts, the Grafana dashboard's PromQL
is accepted; and the failure modes (no env, a taken port, a dead Pushgateway) leave the stage running."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from prom_servers import Prometheus, Pushgateway, binary, get
from s3_servers import free_port
from test_train_stream import fake_cache

from llm2clip import artifacts, monitoring, text_encoder, train_clip, tune_caption_encoder
from llm2clip.cache_caption_embeddings import CacheConfig, cache_caption_embeddings

ROOT = Path(__file__).parents[1]
DASHBOARD = ROOT / "manifests/components/monitoring/grafana/llm2clip-dashboard.json"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Pushgateway and a Prometheus scraping it (honor_labels) and a stage's metrics port, every second."""
    work = tmp_path_factory.mktemp("prom")
    pushgateway = Pushgateway(work)
    pushgateway.start()
    prometheus = Prometheus(work, free_port(), pushgateway)
    try:
        prometheus.start()
        yield prometheus
    finally:
        prometheus.stop()
        pushgateway.stop()


@pytest.fixture()
def no_env(monkeypatch):
    monkeypatch.delenv(monitoring.PORT_ENV, raising=False)
    monkeypatch.delenv(monitoring.PUSHGATEWAY_ENV, raising=False)
    return monkeypatch


def value(name: str, stage: str) -> float:
    return monitoring.REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


def group(pushgateway: Pushgateway, **labels: str) -> dict:
    """The one pushed group whose labels include `labels`."""
    found = [g for g in pushgateway.groups() if labels.items() <= g["labels"].items()]
    assert len(found) == 1, [g["labels"] for g in pushgateway.groups()]
    return found[0]


def pushed(g: dict, name: str) -> list[tuple[dict, float]]:
    return [(m["labels"], float(m["value"])) for m in g[name]["metrics"]]


# ----------------------------------------------------------------------------------------------- unit: the handle


def test_without_the_env_no_server_and_no_push_but_the_counts_are_kept(no_env):
    before = value("llm2clip_steps_total", "tune_caption_encoder")
    with monitoring.stage("tune_caption_encoder") as m:
        m.step(loss=2.0, lr=1e-3, samples=4, tokens=100, step_s=0.5)
        m.step(loss=1.5, lr=1e-3, samples=4, tokens=90, step_s=0.4)
        assert monitoring._servers == {} and m.pushgateway is None
    assert m.pushes == 0
    assert value("llm2clip_steps_total", "tune_caption_encoder") == before + 2
    assert m.totals["steps"] == 2 and m.totals["samples"] == 8 and m.totals["tokens"] == 190
    assert m.totals["loss"] == 1.5 and m.totals["step_seconds_sum"] == pytest.approx(0.9)
    if not torch.cuda.is_initialized():  # documented: no GPU gauges in a process that has not used CUDA
        assert monitoring.REGISTRY.get_sample_value("llm2clip_gpu_memory_allocated_bytes", {"stage": m.stage}) is None


def test_each_local_rank_serves_on_port_plus_its_rank_while_the_stage_runs(no_env):
    port = free_port()
    no_env.setenv(monitoring.PORT_ENV, str(port - 1))
    with monitoring.stage("train_clip", "llm", "/out/x", rank=3, local_rank=1) as m:
        m.step(loss=0.7, lr=2e-4, samples=16, step_s=0.2, wait_s=0.01)
        text = get(f"http://127.0.0.1:{port}/metrics").decode()
    assert re.search(r'^llm2clip_loss\{stage="train_clip"\} 0\.7$', text, re.M), text
    assert 'llm2clip_stage_info{output="/out/x",rank="3",stage="train_clip",variant="llm"} 1.0' in text
    assert 'llm2clip_data_wait_seconds_bucket{le="0.01",stage="train_clip"}' in text
    with pytest.raises(urllib.error.URLError):  # the server stopped with the stage
        get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_taken_port_is_a_warning_and_the_stage_runs_on(no_env, caplog):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        no_env.setenv(monitoring.PORT_ENV, str(port))
        with caplog.at_level(logging.WARNING, "llm2clip.monitoring"), monitoring.stage("train_clip") as m:
            m.step(loss=1.0, samples=2)
    assert f"cannot serve on port {port}" in caplog.text
    assert m.totals["steps"] == 1


def test_a_dead_pushgateway_is_a_warning_and_the_stage_runs_on(no_env, caplog):
    no_env.setenv(monitoring.PUSHGATEWAY_ENV, f"127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, "llm2clip.monitoring"):
        with monitoring.stage("cache_caption_embeddings", "group-0-of-1", push_every_s=0) as m:
            for _ in range(3):
                m.step(samples=5, hits=1, misses=4)
    assert m.totals["steps"] == 3 and m.pushes == 0
    assert caplog.text.count("push to the Pushgateway") == 4  # three running pushes and the final one
    assert "training goes on" in caplog.text


def test_bad_settings_are_named(no_env):
    with pytest.raises(ValueError, match="stage='train'"), monitoring.stage("train"):
        pass
    with pytest.raises(ValueError, match="variant='a/b'"), monitoring.stage("train_clip", "a/b"):
        pass
    no_env.setenv(monitoring.PORT_ENV, "metrics")
    with pytest.raises(ValueError, match="LLM2CLIP_METRICS_PORT='metrics'"), monitoring.stage("train_clip"):
        pass


# ----------------------------------------------------------------------------------------------- Pushgateway


def test_pushes_are_throttled_and_a_failure_pushes_status_failed(servers, no_env):
    pgw = servers.pushgateway
    no_env.setenv(monitoring.PUSHGATEWAY_ENV, pgw.url)
    with monitoring.stage("tune_caption_encoder", "throttled", "/runs/1", push_every_s=3600) as m:
        for _ in range(5):
            m.step(loss=1.0, samples=4)
        assert m.pushes == 0  # the interval has not passed: no running push
    assert m.pushes == 1
    with (
        pytest.raises(RuntimeError, match="boom"),
        monitoring.stage("tune_caption_encoder", "throttled", "/runs/2", push_every_s=0) as m,
    ):
        m.step(loss=3.0, samples=4)
        assert (
            pushed(group(pgw, job="llm2clip", variant="throttled"), "llm2clip_run_status")[0][0]["status"] == "running"
        )
        raise RuntimeError("boom")
    # the second run replaced the first's group (the grouping key has no run id): one group, the failed run's
    g = group(pgw, job="llm2clip", stage="tune_caption_encoder", variant="throttled", rank="0")
    assert pushed(g, "llm2clip_run_status") == [
        (
            {
                "job": "llm2clip",
                "instance": "",
                "stage": "tune_caption_encoder",
                "variant": "throttled",
                "rank": "0",
                "status": "failed",
                "output": "/runs/2",
            },
            1.0,
        )
    ]
    assert pushed(g, "llm2clip_run_errors")[0][1] == 1 and pushed(g, "llm2clip_run_steps")[0][1] == 1


# ----------------------------------------------------------------------------------------------- real stages


def test_prometheus_scrapes_a_running_train_clip_and_its_push_matches_the_manifest(servers, tiny_dataset, tmp_path):
    """Stage 2 as `python -m llm2clip.train_clip` in its own process: Prometheus sees its step counter grow while
    it runs (the server stops with the stage), and after the end the pushed step count is the manifest's."""
    cache = fake_cache(tiny_dataset, tmp_path / "cache")
    out = str(tmp_path / "model")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        monitoring.PORT_ENV: str(servers.stage_port),
        monitoring.PUSHGATEWAY_ENV: f"127.0.0.1:{servers.pushgateway.port}",
    }
    cmd = [
        sys.executable,
        "-m",
        "llm2clip.train_clip",
        "--dataset",
        tiny_dataset,
        "--caption-embeddings",
        cache,
        "--output",
        out,
        "--epochs",
        "20",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--log-every",
        "1000",
        "--checkpoint-every",
        "0",
    ]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        live = 'llm2clip_steps_total{job="llm2clip-stage", stage="train_clip"}'
        running = servers.wait_for(f"{live} > 0", bool, timeout=120, alive=lambda: proc.poll() is None)
        # one scrape holds every series of the target: samples = local batch x steps, one histogram count a step
        same_scrape = servers.query(f'llm2clip_samples_total{{job="llm2clip-stage"}} - 8 * {live}')
        counts = servers.query(f'llm2clip_step_seconds_count{{job="llm2clip-stage"}} - {live}')
        loss = servers.query('llm2clip_loss{job="llm2clip-stage", stage="train_clip"}')
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.decode()[-3000:]
    assert float(running[0]["value"][1]) > 0
    assert [float(r["value"][1]) for r in same_scrape + counts] == [0.0, 0.0]
    assert 0 < float(loss[0]["value"][1]) < 10
    steps = artifacts.read_manifest(out, "train_clip")["metrics"]["steps"]
    assert steps == 20 * (48 // 8)
    final = f'llm2clip_run_status{{job="llm2clip", stage="train_clip", variant="raw", output="{out}"}}'
    status = servers.wait_for(final, bool, timeout=30)
    assert status[0]["metric"]["status"] == "succeeded" and status[0]["metric"]["rank"] == "0"
    run = servers.query('llm2clip_run_steps{job="llm2clip", stage="train_clip", variant="raw", rank="0"}')
    assert float(run[0]["value"][1]) == steps
    # the dashboard's stage-2 panels, run as Grafana runs them (a range query over the run), show this run
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    for title in (
        "Throughput (samples/s)",
        "Loss",
        "Learning rate",
        "Step time (p50, p95)",
        "Steps",
        "Data wait (p50, p95) and share of step time",
    ):
        for target in panels[title]["targets"]:
            expr = target["expr"].replace("$__rate_interval", "10s").replace("$stage", "train_clip")
            values = [float(v) for r in servers.query_range(expr, started, time.time()) for _, v in r["values"]]
            assert any(v == v for v in values), (title, expr)  # some value that is not NaN
    # this run's groups (every rank's) by the output on their status, as a user would pick one run's numbers
    samples = servers.query(f"sum(llm2clip_run_samples * on (stage, variant, rank) group_left {final})")
    assert float(samples[0]["value"][1]) == steps * 8


def test_stage1_and_the_cache_push_their_own_counts(servers, tiny_dataset, tmp_path, no_env):
    """Stage 1 then the cache twice over one store (all misses, then all hits), pushing to the Pushgateway; each
    run's pushed numbers, queried in Prometheus, are the ones the stage itself reports."""
    no_env.setenv(monitoring.PUSHGATEWAY_ENV, servers.pushgateway.url)
    lora = str(tmp_path / "lora")
    tuned = tune_caption_encoder.TuneConfig(
        llm=text_encoder.TINY_LLAMA, steps=3, batch_size=4, lr=1e-3, lora_r=4, warmup_steps=1
    )
    tune_caption_encoder.tune_caption_encoder(tuned, tiny_dataset, lora)
    key = 'job="llm2clip", stage="tune_caption_encoder", variant="default", rank="0"'
    servers.wait_for(f'llm2clip_run_status{{{key}, output="{lora}", status="succeeded"}}', bool, timeout=30)
    assert float(servers.query(f"llm2clip_run_steps{{{key}}}")[0]["value"][1]) == 3
    assert float(servers.query(f"llm2clip_run_samples{{{key}}}")[0]["value"][1]) == 3 * 4
    assert float(servers.query(f"llm2clip_run_tokens{{{key}}}")[0]["value"][1]) > 3 * 4 * 2  # 2+ captions a row

    key = 'job="llm2clip", stage="cache_caption_embeddings", variant="tuned-group-0-of-1", rank="0"'
    runs = []
    for n in (1, 2):
        out = str(tmp_path / f"cache{n}")
        metrics = cache_caption_embeddings(CacheConfig(store_root=str(tmp_path / "store")), tiny_dataset, lora, out)
        servers.wait_for(f'llm2clip_run_status{{{key}, output="{out}", status="succeeded"}}', bool, timeout=30)
        got = {
            name: float(servers.query(f"llm2clip_run_{name}{{{key}}}")[0]["value"][1])
            for name in ("cache_hits", "cache_misses", "tokens", "steps")
        }
        assert got == {
            "cache_hits": metrics["hits"],
            "cache_misses": metrics["misses"],
            "tokens": metrics["padded_tokens"],
            "steps": metrics["shards"],
        }
        runs.append(metrics)
    assert runs[0]["misses"] > runs[0]["hits"]  # an empty store (a caption in two shards is a hit the second time)
    assert runs[1]["hits"] == runs[0]["hits"] + runs[0]["misses"] and runs[1]["misses"] == 0  # all found


# ----------------------------------------------------------------------------------------------- the dashboard


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_queries_are_promql_prometheus_accepts_over_metrics_monitoring_defines(servers):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "llm2clip" and dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]) and p["gridPos"]["w"] <= 24, p["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("samples/s", "loss", "learning rate", "step time", "data wait", "cache hit", "errors", "gpu memory"):
        assert topic in titles, topic
    exprs = _expressions(dashboard)
    assert len(exprs) >= 12
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\bllm2clip_[a-z_]+\b", expr))
        if expr.startswith("label_values("):  # Grafana's, not PromQL: its metric must exist and the series API
            servers.api("series", **{"match[]": expr[len("label_values(") : expr.index(",")]})
            continue
        servers.query(expr.replace("$__rate_interval", "1m").replace("$stage", ".*"))  # raises on any error
    assert used <= monitoring.metric_names(), used - monitoring.metric_names()
    with pytest.raises(ValueError, match="bad_data"):  # the check can fail: Prometheus refuses a broken query
        servers.query("sum by (stage (llm2clip_loss)")


def test_under_torchrun_each_rank_serves_its_own_port_and_pushes_its_own_group(
    servers, tiny_dataset, tmp_path, no_env, capfd
):
    """Stage 2 as the component runs it on a 2-process pod (torchrun): local ranks 0 and 1 serve on port and
    port + 1 (no "cannot serve" warning: no collision), and each rank pushes its own group; the ranks' samples
    add up to the global batch times the steps."""
    no_env.setenv("OMP_NUM_THREADS", "1")
    no_env.setenv(monitoring.PORT_ENV, str(servers.stage_port))
    no_env.setenv(monitoring.PUSHGATEWAY_ENV, servers.pushgateway.url)
    out = str(tmp_path / "ddp")
    cfg = train_clip.TrainClipConfig(epochs=1, batch_size=8, workers=0, checkpoint_every=0)
    metrics = train_clip.launch(cfg, tiny_dataset, out, [fake_cache(tiny_dataset, tmp_path / "cache")], nproc=2)
    assert "cannot serve" not in capfd.readouterr().err
    groups = [
        g
        for g in servers.pushgateway.groups()
        if g["labels"].get("stage") == "train_clip" and pushed(g, "llm2clip_run_status")[0][0]["output"] == out
    ]
    assert sorted(g["labels"]["rank"] for g in groups) == ["0", "1"]
    for g in groups:
        assert pushed(g, "llm2clip_run_status")[0][0]["status"] == "succeeded"
        assert pushed(g, "llm2clip_run_steps")[0][1] == metrics["steps"] == 6
        assert pushed(g, "llm2clip_run_samples")[0][1] == 6 * 4  # the local batch: 8 over 2 ranks


def test_a_stage_inside_another_leaves_the_outer_server_running(no_env):
    port = free_port()
    no_env.setenv(monitoring.PORT_ENV, str(port))
    with monitoring.stage("tune_caption_encoder"):
        with monitoring.stage("cache_caption_embeddings") as inner:
            inner.step(hits=2)
        assert b'llm2clip_cache_hits_total{stage="cache_caption_embeddings"}' in get(f"http://127.0.0.1:{port}/metrics")
    assert port not in monitoring._servers


def test_running_pushes_back_off_after_failures_and_recover(servers, no_env):
    no_env.setenv(monitoring.PUSHGATEWAY_ENV, f"127.0.0.1:{free_port()}")  # nothing listens there
    with monitoring.stage("train_clip", "backoff", push_every_s=10) as m:
        for failures in (1, 2):
            m.last_push -= 10.5 * 2 ** (failures - 1)  # the interval has passed
            m.step()
            assert m.failures == failures and m.pushes == 0
        m.last_push -= 30  # 30 s after the second failure: not due yet (10 s x 2^2)
        assert not m.push_due()
        m.last_push -= 11
        assert m.push_due()
        m.pushgateway = servers.pushgateway.url  # the gateway is back: the next push goes through, the interval resets
        m.step()
        assert m.pushes == 1 and m.failures == 0 and not m.push_due()


def test_a_missing_server_binary_fails_the_test_with_the_install_command():
    """CI must not skip the real-server tests silently: a machine without the binaries fails them."""
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y prometheus prometheus-pushgateway"):
        binary("llm2clip-no-such-server")


def test_the_metrics_the_readme_names_exist():
    """The docs' metrics table names only metrics llm2clip.monitoring defines (a renamed metric breaks dashboards)."""
    root = Path(__file__).resolve().parents[1]
    readme = "".join((root / name).read_text() for name in ("README.md", "docs/cluster.md"))
    named = set(re.findall(r"`(llm2clip_[a-z_]+)`", readme)) - {"llm2clip_raw_llm", "llm2clip_no_centring"}
    assert "llm2clip_steps_total" in named and len(named) >= 10
    defined = set(monitoring.metric_names())
    missing = {n for n in named if n not in defined and f"{n}_bucket" not in defined}  # a histogram by its name
    assert not missing, missing


def test_the_pipelines_concurrent_trainings_push_to_groups_of_their_own(tmp_path):
    """On a cluster the five stage-2 trainings run at once: each has its own Pushgateway group (else they would
    replace each other's summaries), named after what it trains with."""
    caches = {}
    for name, adapter in (("tuned", "sha256:abc"), ("raw", None)):
        (tmp_path / name).mkdir()
        artifacts.write_manifest(
            str(tmp_path / name), "cache_caption_embeddings", {}, {}, encoder={"adapter_fingerprint": adapter}, dim=8
        )
        caches[name] = [str(tmp_path / name)]
    runs = [(train_clip.TrainClipConfig(text_source="clip"), None)]
    runs += [(train_clip.TrainClipConfig(center_text=c), caches[n]) for n in caches for c in (True, False)]
    variants = [train_clip.metrics_variant(cfg, dirs) for cfg, dirs in runs]
    assert sorted(variants) == ["clip", "raw", "raw-uncentred", "tuned", "tuned-uncentred"]
