"""Device and dtype resolution: "auto" per machine, bf16 on a CPU only where it is native."""

import pytest
import torch

from llm2clip import devices


def test_auto_dtype_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(devices.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == "float32"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    assert devices.resolve_dtype("float32", torch.device("cpu")) == "float32"  # explicit settings win


def test_this_machine_resolves_and_describes_itself():
    device, dtype = devices.setup("auto", "auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    info = devices.describe(device, dtype)
    assert info["device"] == str(device) and info["dtype"] == dtype
    if device.type == "cpu":
        assert dtype == ("bfloat16" if devices.cpu_has_native_bf16() else "float32")
        assert info["cpu_native_bf16"] == devices.cpu_hardware_bf16()


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="device='tpu'"):
        devices.resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        devices.resolve_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            devices.resolve_device("cuda")


def test_autocast_float32_is_a_no_op_and_bf16_casts():
    a = torch.randn(4, 4)
    with devices.autocast(torch.device("cpu"), "float32"):
        assert (a @ a).dtype == torch.float32
    with devices.autocast(torch.device("cpu"), "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def test_the_environment_can_force_the_bf16_decision(monkeypatch):
    """LLM2CLIP_CPU_NATIVE_BF16 decides instead of the flags (to run a bf16 machine's path anywhere); the manifest
    still records what the hardware has, and says the decision was forced."""
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setenv(devices.NATIVE_BF16_ENV, "1")
    assert devices.resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    info = devices.describe(torch.device("cpu"), "bfloat16")
    assert info["cpu_native_bf16"] is False and info["cpu_native_bf16_forced"] is True
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setenv(devices.NATIVE_BF16_ENV, "0")
    assert devices.resolve_dtype("auto", torch.device("cpu")) == "float32"
    monkeypatch.setenv(devices.NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="LLM2CLIP_CPU_NATIVE_BF16='yes': must be 1 or 0"):
        devices.resolve_dtype("auto", torch.device("cpu"))
    monkeypatch.delenv(devices.NATIVE_BF16_ENV)
    assert "cpu_native_bf16_forced" not in devices.describe(torch.device("cpu"), "float32")
