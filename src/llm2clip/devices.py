"""Where and in what precision a stage computes: one `device` and one `dtype` setting, resolved per machine.

`device="auto"` is cuda when a GPU is visible, else cpu. `dtype="auto"` is bfloat16 on a GPU that supports it
(float16 on older ones) and, on a CPU, bfloat16 only where the CPU has native bf16 instructions (avx512_bf16 or
AMX). Without them PyTorch emulates bf16: measured on an Intel Xeon without either, a 1024x1024 bf16 matmul ran
7x slower than fp32 and the local default run took 51 minutes instead of 14; on an AMD EPYC with avx512_bf16,
bf16 was 3x faster than fp32. So the choice is made per machine and recorded in every manifest.

`LLM2CLIP_CPU_NATIVE_BF16=1` (or `0`) overrides the CPU check, so that a machine without native bf16 can run the
decision a bf16 machine makes (slowly, emulated) and the other way round; the tests use it to prove that the suite
passes either way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# CPU flags (Linux /proc/cpuinfo names) that make bf16 matmuls native rather than emulated.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# "1" or "0": take that answer instead of reading the CPU flags (see the module docstring).
NATIVE_BF16_ENV = "LLM2CLIP_CPU_NATIVE_BF16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (avx512_bf16 or AMX), where bf16 autocast pays off; the
    environment variable LLM2CLIP_CPU_NATIVE_BF16 ("1"/"0"), when set, decides instead."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{NATIVE_BF16_ENV}={forced!r}: must be 1 or 0 (or unset to read the CPU flags)")
        return forced == "1"
    return cpu_hardware_bf16()


def cpu_hardware_bf16() -> bool:
    """What the CPU flags say, whatever the override: avx512_bf16 or AMX present."""
    return any(f in cpu_flags() for f in CPU_BF16_FLAGS)


def resolve_device(setting: str) -> torch.device:
    """Map "auto" to cuda if available, else cpu; "cuda" without a GPU is an error naming the setting."""
    if setting not in DEVICES:
        raise ValueError(f"device={setting!r}: must be one of {DEVICES}")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is visible (torch.cuda.is_available() is False)")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> str:
    """The compute (autocast) dtype actually used: "auto" resolves per device and CPU model."""
    if setting not in DTYPES:
        raise ValueError(f"dtype={setting!r}: must be one of {DTYPES}")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def setup(device_setting: str, dtype_setting: str) -> tuple[torch.device, str]:
    """Resolve both settings and allow TF32 matmuls on GPU (Ampere+; fp32 accumulate, ~10-bit mantissa inputs)."""
    device = resolve_device(device_setting)
    dtype = resolve_dtype(dtype_setting, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, dtype


def autocast(device: torch.device, dtype: str):
    """Mixed precision on `device` in `dtype`; a no-op for float32 (pooling and losses stay fp32 regardless)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def describe(device: torch.device, dtype: str) -> dict:
    """What a manifest records: the device and dtype actually used, and the hardware behind them."""
    out = {"device": str(device), "dtype": dtype}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out.update(cpu=cpu_name(), cpu_native_bf16=cpu_hardware_bf16(), threads=torch.get_num_threads())
        if os.environ.get(NATIVE_BF16_ENV, "").strip():
            out["cpu_native_bf16_forced"] = cpu_has_native_bf16()
    return out


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
