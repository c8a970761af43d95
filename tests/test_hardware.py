import pytest
import torch

from tuneline import hardware


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_named_precision_is_the_autocast_dtype(precision, dtype):
    assert hardware.amp_dtype(precision) == dtype


@pytest.mark.parametrize(("cpu_bf16", "dtype"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_computes_it(monkeypatch, cpu_bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    assert hardware.amp_dtype("auto") == dtype


@pytest.mark.parametrize(("gpu_bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_a_gpu_is_bf16_or_else_fp16(monkeypatch, gpu_bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: gpu_bf16)
    assert hardware.amp_dtype("auto") == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_autocast_computes_in_the_precision_asked_for():
    a = torch.randn(4, 8)
    with hardware.autocast("fp32"):
        assert (a @ a.T).dtype == torch.float32
    with hardware.autocast("bf16"):
        assert (a @ a.T).dtype == torch.bfloat16
    assert hardware.device() == torch.device("cpu")
