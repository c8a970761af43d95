"""train: LoRA or full fine-tuning on packed, answer-masked sequences.

Setup (model, data, optimizer, resume) → `training.fit` (tuneline/training.py) → the
best validation checkpoint's weights saved as models/adapter (LoRA) and models/merged.
Checkpoints are written at every validation; re-running after a crash resumes from the
newest one when the configuration, data and code are unchanged, and gives the same
losses as an unbroken run.
"""

from __future__ import annotations

import hashlib
import json

import torch

from tuneline import chat, checkpoint, deps, distributed
from tuneline.config import Params
from tuneline.data import BASE_META, MODELS, TOKENIZED, TOKENIZED_META, TRAIN_CURVE, metrics_file
from tuneline.flops import peak_flops, peak_memory_mb, train_flops
from tuneline.hardware import amp_dtype, device
from tuneline.io import atomic_dir, read_json, write_json, write_text
from tuneline.loss import unwrap
from tuneline.modeling import TRAINED_PARAMS, check_pair, identity, load_tokenizer
from tuneline.tokendata import read_rows
from tuneline.tokenization import check_tokenizer
from tuneline.training import (
    Meter,
    Run,
    StepLoss,
    check_accumulation,
    fit,
    make_optimizer,
    prepare_model,
    resume,
    short_of_max_steps,
    total_steps,
)

PARAMS = ("seed", "model.name", *(f"train.{k}" for k in Params.model_fields["train"].annotation.model_fields))
INPUTS = (TOKENIZED,)
OUTS = (MODELS, TRAIN_CURVE)


def fingerprint(params: Params) -> str:
    """What a checkpoint is only valid for: params, the token data, and the training code."""
    data = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(TOKENIZED.iterdir()) if p.is_file()]
    key = json.dumps(
        [params.seed, identity(params.model.name), params.train.model_dump(), data, deps.code_hash("train")],
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def setup(params: Params) -> Run:
    """Tokenizer and model (checked against the token data), rows, optimizer, FLOP counts."""
    cfg, world = params.train, distributed.world()
    tok = load_tokenizer(params.model.name)
    check_pair(params.model.name, tok)
    check_tokenizer(tok)
    train_rows, val_rows = read_rows("train"), read_rows("val")
    check_accumulation(len(train_rows), cfg, world)
    model = prepare_model(params)
    amp = amp_dtype(cfg.precision)
    scaler = torch.amp.GradScaler(device().type, enabled=amp == torch.float16)  # fp16 only: bf16 needs none
    total = total_steps(len(train_rows), cfg, world)
    opt = make_optimizer(model, cfg)
    engine = StepLoss(model)
    if world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(engine)
    peak, device_name = peak_flops(amp)
    return Run(
        model,
        tok,
        engine,
        opt,
        scaler,
        train_rows,
        val_rows,
        tok.pad_token_id,
        total,
        fingerprint(params),
        train_flops(model),
        peak * world if peak else None,
        device_name,
    )


def run(params: Params) -> dict:
    distributed.init()
    cfg, main, world = params.train, distributed.is_main(), distributed.world()
    say = print if main else (lambda *a, **k: None)
    torch.manual_seed(params.seed)
    r = setup(params)
    n_train = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in r.model.parameters() if not p.requires_grad)
    say(f"[train] {cfg.method} on {params.model.name}: trainable {n_train:,} | frozen {n_frozen:,}", flush=True)
    ck = resume(r, world, distributed.rank())
    if ck.step:
        say(f"[train] resuming from checkpoint at step {ck.step}/{r.total}", flush=True)
    amp, device_name = amp_dtype(cfg.precision), r.device_name
    say(
        f"[train] {r.total} steps x {cfg.grad_accum} micro-batches x {cfg.batch_size} sequences x {world} "
        f"process(es); precision={amp or torch.float32}; peak {r.peak / 1e12 if r.peak else float('nan'):.2f} "
        f"TFLOP/s ({device_name})",
        flush=True,
    )
    if note := short_of_max_steps(len(r.train_rows), cfg, world):
        say(f"[train] {note}", flush=True)

    ck, meter, stopped = fit(r, ck, params, on_point=_log_point)

    best_weights = checkpoint.best(ck.best_step)
    if best_weights is not None:  # evaluate and register the best validation checkpoint
        r.model.load_state_dict(best_weights, strict=False)
    metrics = {
        "steps": ck.step,
        "planned_steps": r.total,
        "stopped_early": stopped,
        "best_step": ck.best_step,
        "final_train_loss": ck.curve[-1]["train_loss"],
        "best_val_loss": ck.best,
        "trainable_params": n_train,
        "frozen_params": n_frozen,
        "train_s": meter.total["s"],
        "processes": world,
        **Meter.rates(meter.total, r.peak),
        "peak_memory_mb": peak_memory_mb(),
        "model_flops": meter.total["flops"],
        "precision": str(amp or torch.float32).removeprefix("torch."),
        "device": device_name,
    }
    if main:
        _save(r.model, r.tok, params)
        write_text(
            TRAIN_CURVE,
            "step,train_loss,val_loss,lr\n"
            + "".join(f"{p['step']},{p['train_loss']:.6f},{p.get('val_loss', '')},{p['lr']:.6g}\n" for p in ck.curve),
        )
        write_json(metrics_file("train"), metrics)
        checkpoint.mark_complete()
        _log_plot(ck.curve)
    distributed.barrier()
    distributed.shutdown()
    return metrics


def _save(model, tok, params: Params) -> None:
    """models/adapter (LoRA only) and models/merged: a plain HF model + tokenizer + config."""
    with atomic_dir(MODELS) as tmp:
        if params.train.method == "lora":
            model.save_pretrained(tmp / "adapter")
            if params.train.quantize != "none":  # QLoRA: merged into the full-precision base, as registered
                from peft import PeftModel

                from tuneline.modeling import load_model

                model = PeftModel.from_pretrained(load_model(params.model.name), tmp / "adapter")
            model = model.merge_and_unload()
        model = unwrap(model)
        model.save_pretrained(tmp / "merged")
        if "chat_template_sha256" in read_json(TOKENIZED_META):  # conversations: their template travels with it
            tok.chat_template = chat.template(tok)
        tok.save_pretrained(tmp / "merged")
        write_json(tmp / "merged" / TRAINED_PARAMS, params.model_dump())
        write_json(tmp / BASE_META.name, {"model": params.model.name, "identity": identity(params.model.name)})


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
    lines = ax.get_lines() + ax2.get_lines()  # one legend for both axes: the lr line too
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    log_figure(fig, "loss_curve.png")
    plt.close(fig)
