"""Answer-only next-token loss that projects only trained positions onto the vocabulary.

The vocabulary projection is the largest single matmul for small models (SmolLM2:
576 x 49,152); computing it only where labels are trained skips the prompt and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneline.attention import attention_inputs
from tuneline.packing import IGNORE, collate


def unwrap(model):
    """The transformers *ForCausalLM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trained_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at trained positions only: (logits (N, V) fp32, their targets (N,), keep (B, T-1))."""
    lm = unwrap(model)
    h = lm.base_model(  # backbone: LlamaModel / GPT2Model
        input_ids=batch["input_ids"],
        **attention_inputs(lm, batch["segment_ids"]),  # examples isolated: tuneline/attention.py
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state  # (B, T, C)
    target = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = target != IGNORE  # (B, T-1)
    logits = lm.get_output_embeddings()(h[:, :-1][keep]).float()  # (N, V), N trained tokens
    return logits, target[keep], keep


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over answer tokens, and how many there are.

    Returning the sum (not the mean) lets callers weight every micro-batch and every
    device by its trainable tokens, so accumulation and DDP equal one big batch.
    """
    logits, target, keep = _trained_logits(model, batch)
    return F.cross_entropy(logits, target, reduction="sum"), int(keep.sum())


@torch.no_grad()
def example_totals(model, rows: list[dict], pad_id: int, batch_size: int) -> list[list[tuple[float, int]]]:
    """Per packed row, per example (segment) in it: (summed answer-token loss, answer tokens).
    What perplexity's confidence interval and log-likelihood label scoring resample and rank."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[tuple[float, int]]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits, target, keep = _trained_logits(model, batch)
        losses = F.cross_entropy(logits, target, reduction="none")  # (N,)
        seg = batch["segment_ids"]  # (B, T): 0 = padding, 1..k the row's examples
        row_of = torch.arange(len(chunk), device=device)[:, None].expand_as(keep)[keep]  # (N,)
        seg_of = seg[:, 1:][keep]  # (N,) segment of each target
        for b, r in enumerate(chunk):
            sums = torch.zeros(len(r["seq_lens"]) + 1, dtype=torch.float64, device=device)
            cnt = torch.zeros_like(sums)
            mine = row_of == b
            sums.index_add_(0, seg_of[mine], losses[mine].double())
            cnt.index_add_(0, seg_of[mine], torch.ones_like(losses[mine], dtype=torch.float64))
            out.append([(float(s), int(c)) for s, c in zip(sums[1:].tolist(), cnt[1:].tolist())])
    model.train(was_training)
    return out


@torch.no_grad()
def loss_totals(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """(summed answer-token loss, answer tokens) over packed rows, in eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        s, k = loss_sum(model, batch)
        total, n = total + float(s), n + k
    model.train(was_training)
    return total, n


def mean_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean answer loss over packed rows (validation loss; exp() = perplexity)."""
    total, n = loss_totals(model, rows, pad_id, batch_size)
    return total / max(n, 1)
