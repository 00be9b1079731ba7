"""Self-describing outputs: every stage writes a manifest.json (stage, config, versions, inputs, timings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from llm2clip import storage

MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llm2clip-kfp", "torch", "transformers", "peft", "open_clip_torch", "kfp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# Why a pipeline's no-centring stage-2 training wrote a "skipped" manifest instead of a model (evaluate leaves it out).
NOT_REQUESTED = (
    "not requested: the pipeline trains LLM2CLIP without centring whenever center_text is on, and the raw-LLM model "
    "without centring only with ablations=true"
)


def write_manifest(out_dir: str, stage: str, config: Any, inputs: dict[str, Any], **fields: Any) -> dict:
    """Write `out_dir/manifest.json`; written last, so its presence marks the output as complete."""
    manifest = {
        "stage": stage,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "inputs": inputs,
        "versions": versions(),
        "created_unix": time.time(),
        **fields,
    }
    storage.write_json(storage.join(out_dir, MANIFEST), manifest)
    return manifest


def read_manifest(out_dir: str, stage: str | None = None) -> dict:
    path = storage.join(out_dir, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a complete llm2clip artifact")
    manifest = storage.read_json(path)
    if stage is not None and manifest.get("stage") != stage:
        raise ValueError(f"{out_dir} holds a {manifest.get('stage')!r} artifact, expected {stage!r}")
    return manifest


def scalar_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The float values of a stage's (nested) result as flat "a/b/c" names, what a KFP Metrics artifact shows as
    scalar metrics; intervals (lists), counts (ints) and skipped values (None) are left out."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(scalar_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, float):
            out[f"{prefix}{key}"] = value
    return out


def check(condition: bool, field: str, value: Any, why: str) -> None:
    """Config validation: raise a ValueError naming the field and its bad value."""
    if not condition:
        raise ValueError(f"{field}={value!r}: {why}")


# ----------------------------------------------------------------------------------------------- object store
# With LLM2CLIP_STORE=s3://BUCKET/PREFIX set (from a Secret/ConfigMap on a cluster, `--store` locally), a stage
# writes its bulk output under the store and its KFP artifact holds only `location.json` and a copy of the
# manifest: the KFP launcher never copies shards, caches or checkpoints.
STORE_ENV = "LLM2CLIP_STORE"
LOCATION = "location.json"


def output_location(artifact_path: str, artifact_uri: str) -> str:
    """Where a stage writes: under the store (named after the artifact's run/task/name) or the artifact itself."""
    store = os.environ.get(STORE_ENV)
    if not store:
        return artifact_path
    # Unique per artifact (a hash of its full KFP URI), readable by its task and name.
    digest = hashlib.sha256(str(artifact_uri).encode()).hexdigest()[:16]
    task, name = [p for p in str(artifact_uri).rstrip("/").split("/") if p][-2:]
    return storage.join(store, "artifacts", f"{task}-{digest}", name)


def resolve(artifact_path: str) -> str:
    """The location of an artifact's content: what its location.json points to, else the artifact itself."""
    pointer = Path(artifact_path) / LOCATION
    if not pointer.exists():
        return artifact_path
    uri = json.loads(pointer.read_text())["uri"]
    if not storage.exists(storage.join(uri, MANIFEST)):
        raise FileNotFoundError(
            f"input artifact {artifact_path} points to {uri}, which holds no {MANIFEST}: its objects were deleted "
            "after the run that wrote them, and KFP's cache reused that run's output. Rerun the pipeline without "
            "cache (`llm2clip submit --no-cache`, or enable_caching=False when creating the run)"
        )
    return uri


def point(artifact_path: str, location: str) -> None:
    """Record in the KFP artifact where its content lives, with a copy of the manifest for the UI."""
    if location == artifact_path:
        return
    Path(artifact_path).mkdir(parents=True, exist_ok=True)
    (Path(artifact_path) / LOCATION).write_text(json.dumps({"uri": location}))
    (Path(artifact_path) / MANIFEST).write_bytes(storage.read_bytes(storage.join(location, MANIFEST)))
