"""train: LoRA or full fine-tuning on packed, answer-masked sequences.

One loop, read top to bottom: model → data order → optimizer/schedule → steps (micro-
batches weighted by trainable tokens) → periodic validation + atomic checkpoint → save.
A checkpoint (trainable weights, optimizer, scheduler, RNG, step) is written at every
validation; re-running after a crash resumes from it when the inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from components.tokenize import check_tokenizer, read_rows
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, write_json, write_text
from tuneline.loss import loss_sum, mean_loss, unwrap
from tuneline.modeling import autocast, load_model, load_tokenizer, use_bf16
from tuneline.packing import collate

OUT = Path("models")
CKPT = Path("checkpoints/train")
METRICS = Path("metrics/train.json")
CURVE = Path("plots/train.csv")

# Adapted modules per architecture. GPT-2's c_attn/c_proj are Conv1D (weight stored
# transposed), hence fan_in_fan_out=True for them.
LORA_TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "gpt2": (["c_attn", "c_proj", "c_fc"], True),
}


def wrap_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    arch = model.config.model_type
    targets, fan_in_fan_out = LORA_TARGETS.get(arch, (None, False))
    targets = cfg.lora_targets or targets
    if not targets:
        raise TunelineError(f"train: no known LoRA targets for architecture '{arch}'", "set train.lora_targets")
    n_layers = model.config.num_hidden_layers
    if cfg.lora_layers >= n_layers:
        print(f"[train] train.lora_layers={cfg.lora_layers} >= the model's {n_layers} layers: adapting all", flush=True)
    top = list(range(n_layers - cfg.lora_layers, n_layers)) if 0 < cfg.lora_layers < n_layers else None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM",
                      layers_to_transform=top)
    return get_peft_model(model, lcfg)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine to 10% (nanoGPT's min_lr) / linear to 0 / constant."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


def batch_indices(step: int, micro: int, n_rows: int, cfg, seed: int) -> list[int]:
    """Rows of micro-batch `micro` of optimizer step `step`: a pure function of the step, so
    a resumed run sees exactly the data order of an uninterrupted one."""
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    g = step * cfg.grad_accum + micro
    epoch, k = divmod(g, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def fingerprint(params: Params) -> str:
    data = Path("data/tokenized/train.parquet").stat()
    key = json.dumps([params.seed, params.model.name, params.train.model_dump(), data.st_size, data.st_mtime_ns], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(model, opt, state: dict) -> None:
    with atomic_dir(CKPT) as tmp:
        torch.save({"weights": trainable_state(model), "opt": opt.state_dict(), "rng": torch.get_rng_state(), **state},
                   tmp / "state.pt")


def run(params: Params) -> dict:
    cfg, seed = params.train, params.seed
    torch.manual_seed(seed)
    tok = load_tokenizer(params.model.name)
    check_tokenizer(tok)
    model = load_model(params.model.name)
    if cfg.method == "lora":
        model = wrap_lora(model, cfg)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"[train] {cfg.method} on {params.model.name}: trainable {n_train:,} | frozen {n_frozen:,}", flush=True)

    train_rows, val_rows = read_rows("train"), read_rows("val")
    pad_id = tok.pad_token_id
    bf16 = use_bf16(cfg.precision)
    total = math.ceil(cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    # Resume when a checkpoint of this exact configuration and data exists.
    fp, step, best, best_weights, curve = fingerprint(params), 0, math.inf, None, []
    if (CKPT / "state.pt").is_file():
        ck = torch.load(CKPT / "state.pt", weights_only=False)
        if ck.get("fingerprint") == fp:
            model.load_state_dict(ck["weights"], strict=False)
            opt.load_state_dict(ck["opt"])
            torch.set_rng_state(ck["rng"])
            step, best, best_weights, curve = ck["step"], ck["best"], ck["best_weights"], ck["curve"]
            print(f"[train] resuming from checkpoint at step {step}/{total}", flush=True)

    print(f"[train] {total} steps x {cfg.grad_accum} micro-batches x {cfg.batch_size} sequences; bf16={bf16}", flush=True)
    t0, step0, seen_tokens, seen_trained = time.time(), step, 0, 0
    while step < total:
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = [collate([train_rows[i] for i in batch_indices(step, m, len(train_rows), cfg, seed)], pad_id)
                   for m in range(cfg.grad_accum)]
        # Weight every micro-batch by its share of trainable tokens in the whole step, so
        # k accumulated micro-batches give exactly the gradient of one k-times larger batch.
        n_step = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        step_loss = 0.0
        for b in batches:
            with autocast(cfg.precision):
                s, _ = loss_sum(model, b)
            (s / n_step).backward()
            step_loss += s.detach().item() / n_step
            seen_tokens += int((b["input_ids"] != pad_id).sum())
        seen_trained += n_step
        if not math.isfinite(step_loss):
            raise TunelineError(f"train: loss became {step_loss} at step {step}", "lower train.lr or set train.precision: fp32")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        point = {"step": step, "train_loss": step_loss, "lr": lr}
        if step % cfg.log_every == 0 or step == total:
            dt = time.time() - t0
            point |= {"tokens_per_s": seen_tokens / dt, "trainable_tokens_per_s": seen_trained / dt}
            eta = dt / (step - step0) * (total - step)
            print(f"[train] step {step}/{total} loss {step_loss:.4f} lr {lr:.2e} "
                  f"{point['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s", flush=True)
        if step % cfg.eval_every == 0 or step == total:
            with autocast(cfg.precision):
                point["val_loss"] = mean_loss(model, val_rows, pad_id, cfg.batch_size)
            print(f"[train] step {step} val_loss {point['val_loss']:.4f}", flush=True)
            if point["val_loss"] < best:
                best, best_weights = point["val_loss"], trainable_state(model)
        curve.append(point)
        _log_point(point)
        if "val_loss" in point and step < total:
            save_checkpoint(model, opt, {"fingerprint": fp, "step": step, "best": best,
                                         "best_weights": best_weights, "curve": curve})

    if best_weights is not None:  # evaluate and register the best validation checkpoint
        model.load_state_dict(best_weights, strict=False)
    _save(model, tok, params)
    write_text(CURVE, "step,train_loss,val_loss,lr\n" + "".join(
        f"{p['step']},{p['train_loss']:.6f},{p.get('val_loss', '')},{p['lr']:.6g}\n" for p in curve))
    wall = time.time() - t0
    metrics = {"steps": step, "final_train_loss": curve[-1]["train_loss"], "best_val_loss": best,
               "trainable_params": n_train, "frozen_params": n_frozen, "wall_s": wall,
               "tokens_per_s": seen_tokens / wall if wall else 0.0, "bf16": bf16}
    write_json(METRICS, metrics)
    _log_plot(curve)
    shutil.rmtree(CKPT, ignore_errors=True)
    return metrics


def _save(model, tok, params: Params) -> None:
    """models/adapter (LoRA only) and models/merged: a plain HF model + tokenizer + config."""
    with atomic_dir(OUT) as tmp:
        if params.train.method == "lora":
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model = unwrap(model)
        model.save_pretrained(tmp / "merged")
        tok.save_pretrained(tmp / "merged")
        write_json(tmp / "merged" / "tuneline_params.json", params.model_dump())


def _log_point(point: dict) -> None:
    from tuneline.tracking import log_metrics

    log_metrics({k: v for k, v in point.items() if k != "step"}, step=point["step"])


def _log_plot(curve: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneline.tracking import log_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["step"] for p in curve], [p["train_loss"] for p in curve], label="train loss")
    v = [p for p in curve if "val_loss" in p]
    ax.plot([p["step"] for p in v], [p["val_loss"] for p in v], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax2 = ax.twinx()
    ax2.plot([p["step"] for p in curve], [p["lr"] for p in curve], "k:", alpha=0.4, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    log_figure(fig, "loss_curve.png")
    plt.close(fig)
