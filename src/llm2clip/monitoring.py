"""Prometheus metrics of the running stages (tuning, caching, CLIP training): served for scraping, pushed to a
Pushgateway.

    with monitoring.stage("train_clip", variant="llm", output=out_dir, rank=0, local_rank=0) as m:
        ...
        m.step(loss=0.9, lr=1e-3, samples=64, step_s=0.21, wait_s=0.01)

Scraping (LLM2CLIP_METRICS_PORT set and not 0): while a stage runs, every process serves the `llm2clip_*`
metrics (and process_* RSS/CPU) on port + LOCAL_RANK, so the processes torchrun starts in one pod do not collide.
The pod's named port "metrics" (9464 on the cluster) is local rank 0's: the PodMonitor scrapes local rank 0 of
each pod. Under DDP every rank runs the same steps on its own share of the batch, so the per-pod rates show the
shape of the run, and samples/s times the processes per pod is the pod's throughput. A port already taken is a
logged warning; the stage runs on unobserved. The server stops when the stage ends (the last values are pushed).

Pushing (LLM2CLIP_PUSHGATEWAY = host:port or http URL): every rank pushes a summary of its own numbers, gauges
`llm2clip_run_*`, at the end of the stage (status "succeeded" or "failed") and while it runs at most every
`push_every_s` seconds at a step end (status "running"). The grouping key is {job="llm2clip", stage, variant,
rank}: a stage instance of the pipeline in the Pushgateway's namespace, never a step, run id or time, so the
Pushgateway holds at most stages x variants x ranks groups; the next run of the same stage replaces its groups.
Which run the values belong to is the `output` label of `llm2clip_run_status` (the stage's output URI, which
holds the KFP run id); when they were pushed is the Pushgateway's own `push_time_seconds`. A run on fewer ranks
than the one before leaves the old higher ranks' groups until they are deleted (Pushgateway UI or API). Summing
`llm2clip_run_samples` over rank gives the run's samples. A failed push (gateway down, timeout) is a logged
warning; training goes on, and the running pushes back off (the interval doubles per failure in a row).

Labels are bounded: stage is one of STAGES, variant a short name the stage picks from a small fixed set
(train_clip: clip, tuned, raw, tuned-uncentred, raw-uncentred; cache: tuned or raw
and its shard group; tune: "default"), rank below the world size. GPU memory
gauges are set only in a process that has used CUDA (torch.cuda.memory_allocated / max_memory_allocated of its
current device); on CPU they are absent.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, push_to_gateway
from prometheus_client import start_http_server as _start_http_server

log = logging.getLogger(__name__)

PORT_ENV = "LLM2CLIP_METRICS_PORT"
PUSHGATEWAY_ENV = "LLM2CLIP_PUSHGATEWAY"
JOB = "llm2clip"
STAGES = ("tune_caption_encoder", "cache_caption_embeddings", "train_clip")
PUSH_EVERY_S = 15.0  # running pushes at most this often (seconds); the final push always goes
PUSH_TIMEOUT_S = 3.0  # one push waits at most this long for the Pushgateway (seconds)
PUSH_BACKOFF_MAX_S = 300.0  # after failed pushes the running-push interval doubles per failure, up to this
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

# ---- the live metrics, served while a stage runs; every series is labelled by stage only
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
_L = ["stage"]
STEPS = Counter(
    "llm2clip_steps", "Steps this process ran (optimizer steps; cache: shards embedded)", _L, registry=REGISTRY
)
SAMPLES = Counter(
    "llm2clip_samples",
    "Samples this process consumed: images (train_clip), anchor captions (tune), captions embedded (cache)",
    _L,
    registry=REGISTRY,
)
TOKENS = Counter("llm2clip_tokens", "Tokens the LLM ran over, padding included (tune, cache)", _L, registry=REGISTRY)
LOSS = Gauge("llm2clip_loss", "Loss of the last step (train_clip: the mean over ranks)", _L, registry=REGISTRY)
LR = Gauge("llm2clip_learning_rate", "Learning rate of the last step (largest parameter group)", _L, registry=REGISTRY)
GRAD_NORM = Gauge(
    "llm2clip_grad_norm", "Gradient L2 norm of the last step, before clipping (tune)", _L, registry=REGISTRY
)
STEP_TIME = Histogram(
    "llm2clip_step_seconds",
    "Wall time of one step, data wait included (seconds)",
    _L,
    buckets=STEP_BUCKETS_S,
    registry=REGISTRY,
)
DATA_WAIT = Histogram(
    "llm2clip_data_wait_seconds",
    "Time a step waited for its data (seconds)",
    _L,
    buckets=WAIT_BUCKETS_S,
    registry=REGISTRY,
)
CACHE_HITS = Counter("llm2clip_cache_hits", "Distinct captions found in the embedding store", _L, registry=REGISTRY)
CACHE_MISSES = Counter("llm2clip_cache_misses", "Distinct captions embedded (not in the store)", _L, registry=REGISTRY)
ERRORS = Counter("llm2clip_errors", "Errors: a stage that raised counts one", _L, registry=REGISTRY)
GPU_ALLOCATED = Gauge(
    "llm2clip_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated at the last step", _L, registry=REGISTRY
)
GPU_PEAK = Gauge("llm2clip_gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated so far", _L, registry=REGISTRY)
STAGE_INFO = Info("llm2clip_stage", "The running stage: variant, output URI, rank", _L, registry=REGISTRY)

# ---- the pushed summary: one gauge per total, built afresh for every push (llm2clip_run_<name>)
SUMMARY = {
    "steps": "Steps this rank ran",
    "samples": "Samples this rank consumed (sum over rank for the run's)",
    "tokens": "Tokens the LLM ran over on this rank, padding included",
    "loss": "Loss of the last step",
    "learning_rate": "Learning rate of the last step",
    "grad_norm": "Gradient L2 norm of the last step, before clipping (0 where not reported)",
    "cache_hits": "Distinct captions found in the embedding store",
    "cache_misses": "Distinct captions embedded",
    "errors": "Errors (1 when the stage failed)",
    "seconds": "Seconds since the stage started",
    "step_seconds_sum": "Wall time of all steps (seconds)",
    "data_wait_seconds_sum": "Time the steps waited for data (seconds)",
    "gpu_memory_peak_bytes": "torch.cuda.max_memory_allocated (0 on CPU)",
}
RUN_STATUSES = ("running", "succeeded", "failed")

_servers: dict[int, object] = {}  # port -> the HTTP server this process runs there


def metric_names() -> set[str]:
    """Every llm2clip_* sample name this module serves or pushes, e.g. llm2clip_step_seconds_bucket."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names = {f.name + end for f in REGISTRY.collect() if f.name.startswith("llm2clip_") for end in suffixes[f.type]}
    return names | {f"llm2clip_run_{k}" for k in SUMMARY} | {"llm2clip_run_status"}


@dataclass
class StageMetrics:
    """The handle a stage reports through: `step(...)` after every step. Totals are this stage run's own."""

    stage: str
    variant: str
    output: str
    rank: int
    pushgateway: str | None
    push_every_s: float
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMMARY, 0.0))
    started: float = field(default_factory=time.monotonic)
    last_push: float = field(default_factory=time.monotonic)
    pushes: int = 0  # pushes that reached the Pushgateway
    failures: int = 0  # failed pushes since the last one that went through

    def step(
        self,
        *,
        loss: float | None = None,
        lr: float | None = None,
        grad_norm: float | None = None,
        samples: int = 0,
        tokens: int = 0,
        step_s: float | None = None,
        wait_s: float | None = None,
        hits: int = 0,
        misses: int = 0,
    ) -> None:
        """Record one finished step: its loss, learning rate and gradient norm (before clipping), the samples and
        tokens it consumed, its wall time and data wait (seconds), the cache hits and misses it saw. Pushes when
        `push_every_s` has passed."""
        t, s = self.totals, self.stage
        counted = {
            "steps": (STEPS, 1),
            "samples": (SAMPLES, samples),
            "tokens": (TOKENS, tokens),
            "cache_hits": (CACHE_HITS, hits),
            "cache_misses": (CACHE_MISSES, misses),
        }
        for key, (metric, value) in counted.items():
            metric.labels(s).inc(value)
            t[key] += value
        for key, metric, value in (
            ("loss", LOSS, loss),
            ("learning_rate", LR, lr),
            ("grad_norm", GRAD_NORM, grad_norm),
        ):
            if value is not None:
                metric.labels(s).set(value)
                t[key] = value
        timed = {"step_seconds_sum": (STEP_TIME, step_s), "data_wait_seconds_sum": (DATA_WAIT, wait_s)}
        for key, (metric, value) in timed.items():
            if value is not None:
                metric.labels(s).observe(value)
                t[key] += value
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            GPU_ALLOCATED.labels(s).set(torch.cuda.memory_allocated())
            GPU_PEAK.labels(s).set(peak := torch.cuda.max_memory_allocated())
            t["gpu_memory_peak_bytes"] = peak
        if self.pushgateway and self.push_due():
            self.push("running")

    def push_due(self) -> bool:
        """Whether a running push is due: `push_every_s` since the last push, doubled for each failed push in a row
        (up to PUSH_BACKOFF_MAX_S), so an unreachable Pushgateway costs a timeout rarely, not every interval."""
        interval = min(self.push_every_s * 2**self.failures, max(self.push_every_s, PUSH_BACKOFF_MAX_S))
        return time.monotonic() - self.last_push >= interval

    def error(self) -> None:
        """Count one error of this stage."""
        ERRORS.labels(self.stage).inc()
        self.totals["errors"] += 1

    def push(self, status: str) -> bool:
        """Push the totals under this stage's grouping key (replacing its previous push); False, with a logged
        warning, when the Pushgateway could not be reached. `status` is one of RUN_STATUSES."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status={status!r}: must be one of {RUN_STATUSES}")
        self.last_push = time.monotonic()
        self.totals["seconds"] = time.monotonic() - self.started
        registry = CollectorRegistry()
        for key, help_text in SUMMARY.items():
            Gauge(f"llm2clip_run_{key}", help_text, registry=registry).set(self.totals[key])
        Gauge(
            "llm2clip_run_status",
            "1 for the status of the last push (running, succeeded, failed)",
            ["status", "output"],
            registry=registry,
        ).labels(status, self.output).set(1)
        key = {"stage": self.stage, "variant": self.variant, "rank": str(self.rank)}
        try:
            push_to_gateway(self.pushgateway, JOB, registry, grouping_key=key, timeout=PUSH_TIMEOUT_S)
        except Exception as e:  # a monitoring outage must never stop training
            log.warning(
                "llm2clip metrics: push to the Pushgateway %s failed (%s: %s); training goes on",
                self.pushgateway,
                type(e).__name__,
                e,
            )
            self.failures += 1
            return False
        self.pushes, self.failures = self.pushes + 1, 0
        return True


def serve(port: int) -> bool:
    """Serve REGISTRY on 0.0.0.0:`port`; True when this call started the server. False when this process already
    serves there (a stage inside another: the outer one stops it) or, with a logged warning, when the port cannot
    be bound."""
    if port in _servers:
        return False
    try:
        _servers[port], _ = _start_http_server(port, registry=REGISTRY)
    except OSError as e:
        log.warning("llm2clip metrics: cannot serve on port %d (%s); the stage runs without a metrics server", port, e)
        return False
    return True


def stop_serving(port: int) -> None:
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


@contextmanager
def stage(
    name: str,
    variant: str = "default",
    output: str = "",
    rank: int = 0,
    local_rank: int = 0,
    push_every_s: float = PUSH_EVERY_S,
) -> Iterator[StageMetrics]:
    """Observe one stage run: serve the metrics on LLM2CLIP_METRICS_PORT + local_rank while it runs, push its
    summary to LLM2CLIP_PUSHGATEWAY at the end (and every `push_every_s` seconds at step ends). A stage that raises
    counts an error and pushes status "failed"; the exception goes on. Without the two variables: no server, no
    push, only the in-process metrics."""
    if name not in STAGES:
        raise ValueError(f"stage={name!r}: must be one of {STAGES}")
    if not _VARIANT.fullmatch(variant):
        raise ValueError(f"variant={variant!r}: must be 1-63 of [A-Za-z0-9_.-] (it is a Pushgateway grouping key)")
    raw_port = os.environ.get(PORT_ENV, "").strip() or "0"
    if not raw_port.isdigit() or not 0 <= int(raw_port) < 65536:
        raise ValueError(f"{PORT_ENV}={raw_port!r}: must be a port number (0 or unset: no metrics server)")
    port = int(raw_port) + local_rank if int(raw_port) else 0
    served = serve(port) if port else False
    STAGE_INFO.labels(name).info({"variant": variant, "output": output, "rank": str(rank)})
    m = StageMetrics(name, variant, output, rank, os.environ.get(PUSHGATEWAY_ENV, "").strip() or None, push_every_s)
    status = "failed"
    try:
        yield m
        status = "succeeded"
    except BaseException:
        m.error()
        raise
    finally:
        if m.pushgateway:
            m.push(status)
        if served:
            stop_serving(port)
