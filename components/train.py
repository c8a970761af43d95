"""train: LoRA or full fine-tuning on packed, answer-masked sequences.

One loop, read top to bottom: model → optimizer → resume → steps (micro-batches weighted by
trainable tokens, summed over data-parallel ranks) → log → validate, checkpoint, early
stop → save the best weights. Checkpoints are written at every validation (see
tuneline/checkpoint.py); re-running after a crash resumes from the newest one when the
configuration, data and code are unchanged, and gives the same losses as an unbroken run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from components.tokenize import check_tokenizer, read_rows
from tuneline import checkpoint, distributed, progress
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.flops import peak_flops, peak_memory_mb, train_flops
from tuneline.io import atomic_dir, write_json, write_text
from tuneline.loss import __file__ as loss_file
from tuneline.loss import loss_sum, loss_totals, unwrap
from tuneline.modeling import amp_dtype, autocast, check_pair, device, load_model, load_tokenizer
from tuneline.packing import collate

OUT = Path("models")
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


def prepare_model(params: Params):
    """Base model → gradient checkpointing → LoRA (or all weights trainable)."""
    cfg = params.train
    model = load_model(params.model.name)
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA freezes the
        # embeddings) and works under DDP.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        model = wrap_lora(model, cfg)
    return model.to(device()).train()


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, not on biases and norms (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


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


def batch_indices(step: int, micro: int, n_rows: int, cfg, seed: int, world: int = 1) -> list[int]:
    """Rows of global micro-batch `micro` of optimizer step `step` (batch_size x world rows).

    A pure function of the step, so a resumed run, and any number of data-parallel ranks,
    see exactly the data order of one uninterrupted process.
    """
    size = cfg.batch_size * world
    per_epoch = math.ceil(n_rows / size)
    g = step * cfg.grad_accum + micro
    epoch, k = divmod(g, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[k * size:(k + 1) * size]


def total_steps(n_rows: int, cfg, world: int = 1) -> int:
    total = math.ceil(cfg.epochs * math.ceil(n_rows / (cfg.batch_size * world)) / cfg.grad_accum)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def fingerprint(params: Params) -> str:
    """What a checkpoint is only valid for: params, the token data, and the training code."""
    data = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (Path("data/tokenized/train.parquet"),
                                                               Path("data/tokenized/val.parquet"))]
    code = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (__file__, loss_file)]
    key = json.dumps([params.seed, params.model.name, params.train.model_dump(), data, code], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


class StepLoss(torch.nn.Module):
    """forward(batch) = summed answer-token loss. Wrapping this in DDP (not the bare model)
    lets DDP see the forward that produces the loss, so it can all-reduce the gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return loss_sum(self.model, batch)[0]


def run(params: Params) -> dict:
    distributed.init()
    cfg, seed, main = params.train, params.seed, distributed.is_main()
    world, rank = distributed.world(), distributed.rank()
    say = print if main else (lambda *a, **k: None)
    torch.manual_seed(seed)
    tok = load_tokenizer(params.model.name)
    check_pair(params.model.name, tok)
    check_tokenizer(tok)
    model = prepare_model(params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    say(f"[train] {cfg.method} on {params.model.name}: trainable {n_train:,} | frozen {n_frozen:,}", flush=True)

    train_rows, val_rows = read_rows("train"), read_rows("val")
    pad_id, dev = tok.pad_token_id, device()
    amp = amp_dtype(cfg.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)  # fp16 only: bf16 needs none
    total = total_steps(len(train_rows), cfg, world)
    opt = make_optimizer(model, cfg)
    engine = StepLoss(model)
    if world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(engine)
    flops_tok, flops_trained, flops_ctx2 = train_flops(model)
    peak, device_name = peak_flops(amp)
    peak = peak * world if peak else None

    # Resume from the newest checkpoint of this exact run, if any.
    fp = fingerprint(params)
    step, best, best_step, bad_evals, curve = 0, math.inf, 0, 0, []
    state = checkpoint.latest(fp)
    if state is not None:
        model.load_state_dict(state["weights"], strict=False)
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][rank if len(state["rng"]) == world else 0])
        step, best, best_step, bad_evals, curve = (state[k] for k in ("step", "best", "best_step", "bad_evals", "curve"))
        say(f"[train] resuming from checkpoint at step {step}/{total}", flush=True)
    step0 = step

    say(f"[train] {total} steps x {cfg.grad_accum} micro-batches x {cfg.batch_size} sequences x {world} "
        f"process(es); precision={amp or torch.float32}; peak {peak / 1e12 if peak else float('nan'):.2f} "
        f"TFLOP/s ({device_name})", flush=True)
    busy, window = 0.0, {"t": 0.0, "tokens": 0.0, "trained": 0.0, "flops": 0.0}
    seen_tokens = seen_trained = seen_flops = 0.0
    # A run killed right after its early-stopping validation stays stopped when resumed.
    stopped_early = bool(cfg.patience) and bad_evals >= cfg.patience
    # The bar follows optimizer steps (tokens of all ranks); it reads the clock only, no RNG.
    with progress.bar("train", total, "steps", start=step0, show=main) as bar:
        while step < total and not stopped_early:
            t_step = time.perf_counter()
            lr = lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            # This rank's share of each global micro-batch: (batch_size, T) tensors. A rank whose
            # share is empty (short last batch) runs the batch's first row with weight 0, so it
            # still joins the gradient all-reduce.
            batches, n_local, tokens_local, ctx2_local = [], 0, 0, 0
            for m in range(cfg.grad_accum):
                idx = batch_indices(step, m, len(train_rows), cfg, seed, world)
                mine = [train_rows[i] for i in idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]
                b = {k: v.to(dev) for k, v in collate(mine or [train_rows[idx[0]]], pad_id).items()}
                batches.append((b, 1.0 if mine else 0.0))
                n_local += int((b["labels"][:, 1:] != -100).sum()) if mine else 0
                tokens_local += sum(len(r["input_ids"]) for r in mine)       # real tokens, no padding
                ctx2_local += sum(n * n for r in mine for n in r["seq_lens"])  # attention work, per example
            # Weight every micro-batch by its share of the trainable tokens of the whole step on
            # all ranks, so k micro-batches x w ranks give exactly the gradient of one big batch.
            n_step, tokens = distributed.all_sum(n_local), distributed.all_sum(tokens_local)
            step_flops = flops_tok * tokens + flops_trained * n_step + flops_ctx2 * distributed.all_sum(ctx2_local)
            local_loss = 0.0
            for m, (b, w) in enumerate(batches):
                sync = m == len(batches) - 1 or world == 1
                with (contextlib.nullcontext() if sync else engine.no_sync()), autocast(cfg.precision):
                    s = engine(b)
                # DDP averages gradients over ranks; x world turns that into the sum we want.
                scaler.scale(s * (w * world / n_step)).backward()
                local_loss += w * s.detach().item()
            step_loss = distributed.all_sum(local_loss) / n_step
            if not math.isfinite(step_loss):
                raise TunelineError(f"train: loss became {step_loss} at step {step + 1}",
                                    "lower train.lr or set train.precision: fp32; nothing was saved or registered")
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_step
            busy += dt
            seen_tokens, seen_trained, seen_flops = seen_tokens + tokens, seen_trained + n_step, seen_flops + step_flops
            window = {"t": window["t"] + dt, "tokens": window["tokens"] + tokens, "trained": window["trained"] + n_step,
                      "flops": window["flops"] + step_flops}
            bar.advance(1, tokens=tokens)

            point = {"step": step, "train_loss": step_loss, "lr": lr}
            if step % cfg.log_every == 0 or step == total:
                point |= {"tokens_per_s": window["tokens"] / window["t"], "trainable_tokens_per_s": window["trained"] / window["t"],
                          "peak_memory_mb": peak_memory_mb()}
                if peak:
                    point["mfu"] = window["flops"] / window["t"] / peak
                window = {"t": 0.0, "tokens": 0.0, "trained": 0.0, "flops": 0.0}
                eta = busy / (step - step0) * (total - step)
                mfu = f" MFU {point['mfu']:.1%}" if "mfu" in point else ""
                say(f"[train] step {step}/{total} loss {step_loss:.4f} lr {lr:.2e} "
                    f"{point['tokens_per_s']:.0f} tok/s{mfu} ETA {eta:.0f}s", flush=True)
            if step % cfg.eval_every == 0 or step == total:
                # Each rank scores a slice of the validation rows; the sums make one number.
                with autocast(cfg.precision):
                    s, n = loss_totals(model, val_rows[rank::world], pad_id, cfg.batch_size)
                point["val_loss"] = distributed.all_sum(s) / max(1.0, distributed.all_sum(n))
                improved = point["val_loss"] < best
                best, best_step, bad_evals = ((point["val_loss"], step, 0) if improved else (best, best_step, bad_evals + 1))
                say(f"[train] step {step} val_loss {point['val_loss']:.4f}" + ("" if improved else
                    f" (best {best:.4f} at step {best_step}; {bad_evals} without improvement)"), flush=True)
                stopped_early = bool(cfg.patience) and bad_evals >= cfg.patience and step < total
            curve.append(point)
            if main:
                _log_point(point)
            if "val_loss" in point:
                rngs = distributed.all_gather(torch.get_rng_state())  # every rank's, for exact resume
                if main:  # the best first: a checkpoint never names a best that is not on disk
                    if best_step == step:
                        checkpoint.save_best(trainable_state(model), step, best)
                    checkpoint.save({"fingerprint": fp, "step": step, "weights": trainable_state(model),
                                     "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                                     "schedule": {"step": step, "total": total, "lr": lr},
                                     "data_order": {"seed": seed, "micro_batches_done": step * cfg.grad_accum},
                                     "rng": rngs, "best": best, "best_step": best_step, "bad_evals": bad_evals,
                                     "curve": curve},
                                    step, cfg.keep_checkpoints)
                distributed.barrier()
            if stopped_early:
                say(f"[train] early stop at step {step}: no better validation loss for {cfg.patience} "
                    f"validations; keeping step {best_step} (val_loss {best:.4f})", flush=True)
                break

    best_weights = checkpoint.best(best_step)
    if best_weights is not None:  # evaluate and register the best validation checkpoint
        model.load_state_dict(best_weights, strict=False)
    metrics = {"steps": step, "planned_steps": total, "stopped_early": stopped_early, "best_step": best_step,
               "final_train_loss": curve[-1]["train_loss"], "best_val_loss": best,
               "trainable_params": n_train, "frozen_params": n_frozen, "train_s": busy, "processes": world,
               "tokens_per_s": seen_tokens / busy if busy else 0.0,
               "trainable_tokens_per_s": seen_trained / busy if busy else 0.0,
               "peak_memory_mb": peak_memory_mb(), "model_flops": seen_flops,
               "precision": str(amp or torch.float32).removeprefix("torch."), "device": device_name}
    if peak and busy:  # whole-run MFU: model FLOPs done / (training seconds x peak FLOP/s)
        metrics["mfu"] = seen_flops / busy / peak
    if main:
        _save(model, tok, params)
        write_text(CURVE, "step,train_loss,val_loss,lr\n" + "".join(
            f"{p['step']},{p['train_loss']:.6f},{p.get('val_loss', '')},{p['lr']:.6g}\n" for p in curve))
        write_json(METRICS, metrics)
        checkpoint.mark_complete()
        _log_plot(curve)
    distributed.barrier()
    distributed.shutdown()
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
    lines = ax.get_lines() + ax2.get_lines()  # one legend for both axes: the lr line too
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    log_figure(fig, "loss_curve.png")
    plt.close(fig)
