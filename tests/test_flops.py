import pytest
import torch

from tuneline import flops
from tuneline.modeling import scratch_model


def test_full_training_flops_match_the_6n_plus_attention_formula():
    """GPT-2 124M at T=1024: nanoGPT's estimate is 6N + 12·L·H·Q·T with N = params - wpe."""
    model = scratch_model("gpt2-scratch-small")
    per_token, per_trained, per_context2 = flops.train_flops(model)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    nanogpt = 6 * n + 12 * 12 * 768 * 1024
    # one 1024-token document, every token trained; ours counts matmul weights only (no
    # biases / LayerNorms): within 0.1% of nanoGPT's
    assert per_token + per_trained + per_context2 * 1024**2 / 1024 == pytest.approx(nanogpt, rel=1e-3)
    # packed: 16 isolated 64-token examples need 1/16 of the attention of one 1024 document
    assert per_context2 * 16 * 64**2 == pytest.approx(per_context2 * 1024**2 / 16)


def test_lora_on_the_top_block_costs_less_than_full_training_more_than_a_forward():
    from peft import LoraConfig, get_peft_model

    full = flops.train_flops(scratch_model("gpt2-scratch-tiny"))
    lora = get_peft_model(
        scratch_model("gpt2-scratch-tiny"),
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, layers_to_transform=[3]),
    )
    per_token, per_trained, per_context2 = flops.train_flops(lora)
    blocks = flops._blocks(lora)
    forward = sum(2 * sum(p.numel() for p in flops._matmul_weights(b)) for b in blocks)
    assert forward < per_token < full[0] and 4 * 256 * 4 < per_context2 < full[2]
    # only the top block is backpropagated: blocks 0-2 cost exactly their forward
    top = blocks[3]
    n_top = sum(p.numel() for p in flops._matmul_weights(top))
    n_lora = sum(p.numel() for p in flops._matmul_weights(top) if p.requires_grad)
    assert per_token == forward + 2 * n_top + 2 * n_lora
    assert per_context2 == 3 * 4 * 256 + 12 * 256


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", None, 67.0),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312.0),
        ("NVIDIA L40", torch.bfloat16, 181.0),
    ],
)
def test_gpu_peak_comes_from_the_table(monkeypatch, name, dtype, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert flops.peak_flops(dtype) == (tflops * 1e12, name)


def test_unknown_gpu_has_no_peak_rather_than_a_guess(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Imaginary GPU 9000")
    assert flops.peak_flops(torch.bfloat16)[0] is None


def test_cpu_peak_uses_cores_clock_and_instruction_set(monkeypatch):
    zen4 = {
        "vendor_id": "AuthenticAMD",
        "flags": "fma avx2 avx512f avx512_bf16",
        "cpu MHz": "2500.0",
        "model name": "AMD EPYC",
        "cpu cores": "2",
        "siblings": "2",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(flops, "_cpuinfo", lambda: zen4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(flops.os, "sched_getaffinity", lambda pid: {0, 1})
    assert flops.peak_flops(torch.bfloat16)[0] == 2 * 2.5e9 * 64
    assert flops.peak_flops(None)[0] == 2 * 2.5e9 * 32
    smt = zen4 | {"cpu cores": "1", "siblings": "2"}  # two hyper-threads of one core: one core's FMA units
    monkeypatch.setattr(flops, "_cpuinfo", lambda: smt)
    assert flops.peak_flops(None)[0] == 1 * 2.5e9 * 32
