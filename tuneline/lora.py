"""Which modules LoRA adapts, per architecture (read by training and by the preflight,
which must not import torch to check them)."""

from __future__ import annotations

from tuneline.config import TrainCfg
from tuneline.errors import TunelineError

# Adapted modules per architecture. GPT-2's c_attn/c_proj are Conv1D (weight stored
# transposed), hence fan_in_fan_out=True for them.
LORA_TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "gpt2": (["c_attn", "c_proj", "c_fc"], True),
}


def lora_targets(model_type: str, cfg: TrainCfg) -> tuple[list[str], bool]:
    """(module names to adapt, fan_in_fan_out): train.lora_targets, else the known set."""
    targets, fan_in_fan_out = LORA_TARGETS.get(model_type, (None, False))
    targets = cfg.lora_targets or targets
    if not targets:
        raise TunelineError(
            f"train: no known LoRA targets for architecture '{model_type}'",
            "set train.lora_targets to the names of its linear layers",
        )
    return targets, fan_in_fan_out


def check_quantize(cfg: TrainCfg) -> None:
    """QLoRA's 4-bit base runs on bitsandbytes' CUDA kernels: where they cannot run, one
    line that says so (before any data is read), not a crash at the first step."""
    if cfg.quantize == "none":
        return
    import torch

    if not torch.cuda.is_available():
        raise TunelineError(
            f"train.quantize '{cfg.quantize}' (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels run on CUDA, "
            "and this machine has none",
            "set train.quantize: none (LoRA over the full-precision base: the same adapters, more memory), "
            "or run on a CUDA machine",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TunelineError(
            f"train.quantize '{cfg.quantize}' (QLoRA) needs the bitsandbytes package",
            "pip install bitsandbytes, or set train.quantize: none",
        ) from None
