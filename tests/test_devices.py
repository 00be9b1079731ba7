"""Device and dtype resolution: "auto" per machine, bf16 on a CPU only where it is native."""

import pytest
import torch

from llm2clip import devices


def test_auto_dtype_follows_the_cpu_flags(monkeypatch):
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
        assert info["cpu_native_bf16"] == devices.cpu_has_native_bf16()
        assert dtype == ("bfloat16" if devices.cpu_has_native_bf16() else "float32")


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
