"""Self-describing outputs: every stage writes a manifest.json (stage, config, versions, inputs, timings)."""

from __future__ import annotations

import dataclasses
import platform
import time
from importlib import metadata
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


def check(condition: bool, field: str, value: Any, why: str) -> None:
    """Config validation: raise a ValueError naming the field and its bad value."""
    if not condition:
        raise ValueError(f"{field}={value!r}: {why}")
