"""Training FLOPs per token, the device's peak FLOP/s, and peak memory: the parts of MFU.

MFU (model FLOPs utilization, PaLM appendix B) = model FLOPs done per second / peak FLOP/s.
Model FLOPs count only what the model needs, not recomputation (gradient checkpointing)
and not padding.

Per token, a matmul with weight W (n = numel) costs 2n in forward, 2n more in backward for
the gradient of its input (needed whenever backward must pass below it) and 2n for the
gradient of W (only if W is trained). For full fine-tuning that is the familiar 6N.
Attention adds, per layer and token, 4·d·T forward (QK^T and AV over T positions, d = heads
x head dim) and 8·d·T backward, hence PaLM's and nanoGPT's 12·L·d·T for full training:

    full:  6·N_body + 12·L·d·T  (+ 6·N_head on trained tokens only)
    LoRA:  blocks at or above the lowest adapted block: 4·N_frozen + 6·N_lora + 12·d·T;
           blocks below it: forward only, 2·N + 4·d·T

N counts matmul weights (embedding lookups cost no FLOPs). The vocabulary projection is
counted only on trained (answer) tokens, because our loss projects only those. T is the
length of the example a token attends within: packed examples are isolated, so a token of
a 40-token example needs 40 positions of attention, not the row's 512 (the masked rest is
work the hardware does but the model does not need). A step's attention FLOPs are
therefore coefficient x sum over examples of length^2.
"""

from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (bf16/fp16 tensor core, fp32).
# Matched in order against torch.cuda.get_device_name(), so more specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),  # fp16 only
    ("T4", 65.0, 8.1),  # fp16 only
]

# CPU FLOPs per cycle per physical core: (16-bit autocast dtype, fp32), by instruction set.
# Intel AVX-512 parts have two 512-bit FMA ports; AMD Zen 4 runs AVX-512 on two 256-bit pipes.
CPU_FLOPS_PER_CYCLE: list[tuple[str, str, float, float]] = [
    # (vendor, required flag, 16-bit, fp32)
    ("GenuineIntel", "amx_bf16", 1024.0, 64.0),
    ("GenuineIntel", "avx512_bf16", 128.0, 64.0),
    ("GenuineIntel", "avx512f", 64.0, 64.0),
    ("AuthenticAMD", "avx512_bf16", 64.0, 32.0),
    ("AuthenticAMD", "avx512f", 32.0, 32.0),
    ("", "avx2", 32.0, 32.0),  # two 256-bit FMA pipes (Haswell+, Zen 2/3)
    ("", "", 8.0, 8.0),
]


def _blocks(model) -> list[torch.nn.Module]:
    from tuneline.loss import unwrap

    backbone = unwrap(model).base_model
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(backbone, attr, None), torch.nn.ModuleList):
            return list(getattr(backbone, attr))
    raise ValueError(f"cannot find the transformer blocks of {type(backbone).__name__}")


def _matmul_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights of Linear / GPT-2 Conv1D / LoRA layers inside `module` (no biases, norms, embeddings)."""
    return [
        p
        for m in module.modules()
        for n, p in m.named_parameters(recurse=False)
        if n == "weight" and p.dim() == 2 and not isinstance(m, torch.nn.Embedding)
    ]


def train_flops(model) -> tuple[float, float, float]:
    """(FLOPs per processed token, per trained token, per unit of attended context^2).

    A step's model FLOPs = per_token x real tokens + per_trained x trained tokens
    + per_context2 x sum of (example length)^2 over the step's examples.
    """
    from tuneline.loss import unwrap

    lm = unwrap(model)
    blocks = _blocks(model)
    d = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
    trained = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    embed_trained = lm.get_input_embeddings().weight.requires_grad
    lowest = 0 if embed_trained else next((i for i, t in enumerate(trained) if t), len(blocks))
    per_token = per_context2 = 0.0
    for i, block in enumerate(blocks):
        w = _matmul_weights(block)
        n, n_trained = sum(p.numel() for p in w), sum(p.numel() for p in w if p.requires_grad)
        if i >= lowest:  # backward passes through this block
            per_token += 4 * n + 2 * n_trained
            per_context2 += 12 * d
        else:
            per_token += 2 * n
            per_context2 += 4 * d
    head = lm.get_output_embeddings().weight
    reached = lowest < len(blocks)
    per_trained = (2 + 2 * reached) * head.numel() + 2 * head.numel() * head.requires_grad
    return float(per_token), float(per_trained), float(per_context2)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def peak_flops(dtype: torch.dtype | None) -> tuple[float | None, str]:
    """(peak FLOP/s for `dtype` on this device, the device's description); None when unknown."""
    half = dtype in (torch.bfloat16, torch.float16)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tensor, fp32 in GPU_PEAK_TFLOPS:
            if key in name:
                return (tensor if half else fp32) * 1e12, name
        return None, name
    info = _cpuinfo()
    vendor, flags = info.get("vendor_id", ""), set(info.get("flags", "").split())
    mhz = float(info.get("cpu MHz", 0) or 0)
    name = info.get("model name", platform.processor() or "cpu")
    if not mhz:
        m = re.search(r"@\s*([\d.]+)\s*GHz", name)
        mhz = float(m.group(1)) * 1000 if m else 0.0
    if not mhz:
        return None, name
    # Hyper-threads share a core's FMA units: count physical cores among the threads we may use.
    threads = min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    per_core = int(info.get("cpu cores", 0) or 0) / max(1, int(info.get("siblings", 1) or 1))
    cores = max(1.0, threads * (per_core or 1.0))
    for v, flag, f16, f32 in CPU_FLOPS_PER_CYCLE:
        if (not v or v == vendor) and (not flag or flag in flags):
            per_cycle = f16 if half else f32
            return cores * mhz * 1e6 * per_cycle, f"{name} x{cores:g} cores @ {mhz / 1000:.2f} GHz ({flag or 'scalar'})"
    return None, name


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
