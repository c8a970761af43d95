"""The training loop and what it is made of: the model's trainable part, the optimizer, the
schedule, the data order, one optimizer step, validation, and the loop state a
checkpoint carries (litgpt/torchtune's split: setup in components/train.py, `fit` here).

Losses are summed answer-token cross-entropies (tuneline/loss.py), so every micro-batch
and every data-parallel rank is weighted by its trainable tokens: k micro-batches on w
ranks give exactly the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tuneline import checkpoint, distributed, progress
from tuneline.checkpoint import Checkpoint
from tuneline.config import Params, TrainCfg
from tuneline.errors import TunelineError
from tuneline.hardware import autocast, device
from tuneline.lora import check_quantize, lora_targets
from tuneline.loss import loss_sum, loss_totals
from tuneline.modeling import load_4bit, load_model
from tuneline.packing import IGNORE, collate


def wrap_lora(model, cfg: TrainCfg):
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = lora_targets(model.config.model_type, cfg)
    n_layers = model.config.num_hidden_layers
    if cfg.lora_layers >= n_layers:
        print(f"[train] train.lora_layers={cfg.lora_layers} >= the model's {n_layers} layers: adapting all", flush=True)
    top = list(range(n_layers - cfg.lora_layers, n_layers)) if 0 < cfg.lora_layers < n_layers else None
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
        layers_to_transform=top,
        use_dora=cfg.lora_variant == "dora",
        use_rslora=cfg.lora_variant == "rslora",
    )
    return get_peft_model(model, lcfg)


def prepare_model(params: Params):
    """Base model → gradient checkpointing → LoRA (or all weights trainable). QLoRA: the
    base loaded in 4-bit on the GPU, prepared by peft for k-bit training."""
    cfg = params.train
    if cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        check_quantize(cfg)
        model = prepare_model_for_kbit_training(
            load_4bit(params.model.name),
            use_gradient_checkpointing=cfg.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        return wrap_lora(model, cfg).train()  # already placed on the GPU: 4-bit weights are not moved
    model = load_model(params.model.name)
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA freezes the
        # embeddings) and works under DDP.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        model = wrap_lora(model, cfg)
    return model.to(device()).train()


def make_optimizer(model, cfg: TrainCfg) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, not on biases and norms (nanoGPT's grouping).
    With LoRA+ (train.loraplus_lr_ratio > 1), peft's grouping: the B matrices and 1-D
    trainables at that many times the learning rate. Each group's `lr_scale` is its share
    of the scheduled rate (`lr_at`)."""
    if cfg.method == "lora" and cfg.loraplus_lr_ratio > 1:
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=cfg.lr,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay,
            betas=(0.9, 0.95),
        )
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))
    for group in opt.param_groups:
        group["lr_scale"] = group["lr"] / cfg.lr
    return opt


def lr_at(step: int, total: int, cfg: TrainCfg) -> float:
    """Linear warmup, then cosine to 10% (nanoGPT's min_lr) / linear to 0 / constant."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - done)
    return cfg.lr


def per_epoch(n_rows: int, cfg: TrainCfg, world: int = 1) -> int:
    """Global micro-batches in one epoch (the last one may be short)."""
    return math.ceil(n_rows / (cfg.batch_size * world))


def batch_indices(step: int, micro: int, n_rows: int, cfg: TrainCfg, seed: int, world: int = 1) -> list[int]:
    """Rows of global micro-batch `micro` of optimizer step `step` (batch_size x world rows).

    A pure function of the step, so a resumed run, and any number of data-parallel ranks,
    see exactly the data order of one uninterrupted process.
    """
    size = cfg.batch_size * world
    g = step * cfg.grad_accum + micro
    epoch, k = divmod(g, per_epoch(n_rows, cfg, world))
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[k * size : (k + 1) * size]


def check_accumulation(n_rows: int, cfg: TrainCfg, world: int = 1) -> None:
    """Refuse more micro-batches per optimizer step than an epoch holds: the step would wrap
    into the next epoch's order and see some rows twice (HF's Trainer ends such a step at
    the epoch's end instead; here a step is always grad_accum micro-batches)."""
    n = per_epoch(n_rows, cfg, world)
    if cfg.grad_accum > n:
        procs = f" x {world} processes" if world > 1 else ""
        raise TunelineError(
            f"train.grad_accum is {cfg.grad_accum}, but an epoch holds only {n} micro-batch(es) "
            f"({n_rows} packed rows / train.batch_size {cfg.batch_size}{procs}): a step would see rows twice",
            f"set train.grad_accum to at most {n}, or lower train.batch_size",
        )


def total_steps(n_rows: int, cfg: TrainCfg, world: int = 1) -> int:
    total = math.ceil(cfg.epochs * per_epoch(n_rows, cfg, world) / cfg.grad_accum)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def short_of_max_steps(n_rows: int, cfg: TrainCfg, world: int = 1) -> str:
    """Why a run trains fewer steps than train.max_steps, or '': max_steps caps the steps
    that train.epochs gives (as litgpt's does), where HF Trainer's would replace epochs, so
    `--set train.max_steps=20` on 120 rows trained 10 steps without a word."""
    total = total_steps(n_rows, cfg, world)
    if not cfg.max_steps or total >= cfg.max_steps:
        return ""
    return (
        f"train.max_steps={cfg.max_steps} is not reached: train.epochs={cfg.epochs:g} over {n_rows} packed rows "
        f"gives {total} steps (max_steps caps the steps; raise train.epochs to train longer)"
    )


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


@dataclass
class Meter:
    """Seconds, tokens, trainable tokens and model FLOPs of optimizer steps: `window` since
    the last log line, `total` since this process started (validation and saving excluded)."""

    window: dict = field(default_factory=lambda: dict.fromkeys(("s", "tokens", "trained", "flops"), 0.0))
    total: dict = field(default_factory=lambda: dict.fromkeys(("s", "tokens", "trained", "flops"), 0.0))

    def add(self, s: float, tokens: float, trained: float, flops: float) -> None:
        for d in (self.window, self.total):
            d["s"], d["tokens"], d["trained"], d["flops"] = (
                d["s"] + s,
                d["tokens"] + tokens,
                d["trained"] + trained,
                d["flops"] + flops,
            )

    @staticmethod
    def rates(d: dict, peak: float | None) -> dict[str, float]:
        out = {
            "tokens_per_s": d["tokens"] / d["s"] if d["s"] else 0.0,
            "trainable_tokens_per_s": d["trained"] / d["s"] if d["s"] else 0.0,
        }
        if peak and d["s"]:  # MFU: model FLOPs done / (training seconds x peak FLOP/s)
            out["mfu"] = d["flops"] / d["s"] / peak
        return out

    def take_window(self, peak: float | None) -> dict[str, float]:
        rates = self.rates(self.window, peak)
        self.window = dict.fromkeys(self.window, 0.0)
        return rates


@dataclass
class Run:
    """Everything `fit` works with, built once by the train stage."""

    model: torch.nn.Module  # the (PEFT-wrapped) causal LM
    tok: object  # its tokenizer (saved with the merged model)
    engine: torch.nn.Module  # StepLoss(model), DDP-wrapped on several ranks
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_rows: Sequence[dict]  # tokendata.TokenRows: read from disk a row at a time
    val_rows: Sequence[dict]
    pad_id: int
    total: int  # optimizer steps planned
    fingerprint: str  # what a checkpoint of this run is valid for
    flops: tuple[float, float, float]  # model FLOPs per (token, trained token, example length^2)
    peak: float | None  # peak FLOP/s of all ranks (None: unknown)
    device_name: str  # what the peak is for


def resume(run: Run, world: int, rank: int) -> Checkpoint:
    """The newest checkpoint of this exact run, loaded into model, optimizer and scaler; or a
    fresh loop state."""
    ck = checkpoint.latest(run.fingerprint)
    if ck is None:
        return Checkpoint(fingerprint=run.fingerprint)
    run.model.load_state_dict(ck.weights, strict=False)
    run.opt.load_state_dict(ck.opt)
    run.scaler.load_state_dict(ck.scaler)
    torch.set_rng_state(ck.rng[rank if len(ck.rng) == world else 0])
    return ck


def micro_batches(run: Run, step: int, cfg: TrainCfg, seed: int, world: int, rank: int):
    """This rank's share of each global micro-batch of `step`: [(batch of (batch_size, T)
    tensors, weight)], plus its trainable tokens, real tokens and attention work (sum of
    example length squared). A rank whose share is empty (short last batch) runs the
    batch's first row with weight 0, so it still joins the gradient all-reduce."""
    dev = device()
    batches, n_local, tokens_local, ctx2_local = [], 0, 0, 0
    for m in range(cfg.grad_accum):
        idx = batch_indices(step, m, len(run.train_rows), cfg, seed, world)
        mine = [run.train_rows[i] for i in idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
        b = {k: v.to(dev) for k, v in collate(mine or [run.train_rows[idx[0]]], run.pad_id).items()}
        batches.append((b, 1.0 if mine else 0.0))
        n_local += int((b["labels"][:, 1:] != IGNORE).sum()) if mine else 0
        tokens_local += sum(len(r["input_ids"]) for r in mine)  # real tokens, no padding
        ctx2_local += sum(n * n for r in mine for n in r["seq_lens"])  # attention work, per example
    return batches, n_local, tokens_local, ctx2_local


def optimizer_step(run: Run, batches, n_step: int, precision: str, max_grad_norm: float, world: int) -> float:
    """Forward and backward every micro-batch, weighted by its share of the trainable tokens
    of the whole step on all ranks; clip, step, zero. Returns the step's mean token loss."""
    local_loss = 0.0
    for m, (b, w) in enumerate(batches):
        sync = m == len(batches) - 1 or world == 1
        with contextlib.nullcontext() if sync else run.engine.no_sync(), autocast(precision):
            s = run.engine(b)
        # DDP averages gradients over ranks; x world turns that into the sum we want.
        run.scaler.scale(s * (w * world / n_step)).backward()
        local_loss += w * s.detach().item()
    step_loss = distributed.all_sum(local_loss) / n_step
    if not math.isfinite(step_loss):
        return step_loss  # the caller stops before the optimizer takes a non-finite step
    run.scaler.unscale_(run.opt)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return step_loss


def validate(run: Run, cfg: TrainCfg, world: int, rank: int) -> float:
    """Token-weighted mean answer loss on the validation rows; each rank scores a slice and
    the sums make one number."""
    with autocast(cfg.precision):
        s, n = loss_totals(run.model, run.val_rows[rank::world], run.pad_id, cfg.batch_size)
    return distributed.all_sum(s) / max(1.0, distributed.all_sum(n))


def save_checkpoint(run: Run, ck: Checkpoint, keep: int, main: bool) -> None:
    """The best weights first (a checkpoint never names a best that is not on disk), then
    the resume state; every rank's RNG, for an exact resume."""
    rngs = distributed.all_gather(torch.get_rng_state())
    if main:
        weights = trainable_state(run.model)
        if ck.best_step == ck.step:
            checkpoint.save_best(weights, ck.step, ck.best)
        ck.weights, ck.opt, ck.scaler, ck.rng = weights, run.opt.state_dict(), run.scaler.state_dict(), rngs
        checkpoint.save(ck, keep)
    distributed.barrier()


def fit(run: Run, ck: Checkpoint, params: Params, on_point=lambda point: None) -> tuple[Checkpoint, Meter, bool]:
    """Train from `ck.step` to `run.total` (or an early stop). Every step: lr, micro-batches,
    forward/backward, optimizer step; every log_every steps a point with throughput;
    every eval_every steps validation, early-stopping bookkeeping and a checkpoint.
    Returns the final loop state, the throughput meter and whether it stopped early."""
    cfg, seed = params.train, params.seed
    world, rank, main = distributed.world(), distributed.rank(), distributed.is_main()
    say = print if main else (lambda *a, **k: None)
    flops_tok, flops_trained, flops_ctx2 = run.flops
    meter, step0 = Meter(), ck.step
    # A run killed right after its early-stopping validation stays stopped when resumed.
    stopped = bool(cfg.patience) and ck.bad_evals >= cfg.patience
    # The bar follows optimizer steps (tokens of all ranks) and shows the one tok/s figure.
    with progress.bar("train", run.total, "steps", start=step0, show=main) as bar:
        while ck.step < run.total and not stopped:
            t0 = time.perf_counter()
            lr = lr_at(ck.step, run.total, cfg)
            for group in run.opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            batches, n_local, tokens_local, ctx2_local = micro_batches(run, ck.step, cfg, seed, world, rank)
            n_step, tokens = distributed.all_sum(n_local), distributed.all_sum(tokens_local)
            step_flops = flops_tok * tokens + flops_trained * n_step + flops_ctx2 * distributed.all_sum(ctx2_local)
            loss = optimizer_step(run, batches, n_step, cfg.precision, cfg.max_grad_norm, world)
            if not math.isfinite(loss):
                raise TunelineError(
                    f"train: loss became {loss} at step {ck.step + 1}",
                    "lower train.lr or set train.precision: fp32; nothing was saved or registered",
                )
            ck.step += 1
            meter.add(time.perf_counter() - t0, tokens, n_step, step_flops)
            bar.advance(1, tokens=tokens)

            point = {"step": ck.step, "train_loss": loss, "lr": lr}
            if ck.step % cfg.log_every == 0 or ck.step == run.total:
                from tuneline.flops import peak_memory_mb

                point |= meter.take_window(run.peak) | {"peak_memory_mb": peak_memory_mb()}
                say(f"[train] step {ck.step}/{run.total} loss {loss:.4f} lr {lr:.2e}", flush=True)
            if ck.step % cfg.eval_every == 0 or ck.step == run.total:
                point["val_loss"] = validate(run, cfg, world, rank)
                improved = point["val_loss"] < ck.best
                if improved:
                    ck.best, ck.best_step, ck.bad_evals = point["val_loss"], ck.step, 0
                else:
                    ck.bad_evals += 1
                say(
                    f"[train] step {ck.step} val_loss {point['val_loss']:.4f}"
                    + (
                        ""
                        if improved
                        else f" (best {ck.best:.4f} at step {ck.best_step}; {ck.bad_evals} without improvement)"
                    ),
                    flush=True,
                )
                stopped = bool(cfg.patience) and ck.bad_evals >= cfg.patience and ck.step < run.total
            ck.curve.append(point)
            if main:
                on_point(point)
            if "val_loss" in point:
                save_checkpoint(run, ck, cfg.keep_checkpoints, main)
            if stopped:
                say(
                    f"[train] early stop at step {ck.step}: no better validation loss for {cfg.patience} "
                    f"validations; keeping step {ck.best_step} (val_loss {ck.best:.4f})",
                    flush=True,
                )
    return ck, meter, stopped
