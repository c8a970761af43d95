"""Answer-only next-token loss that projects only trained positions onto the vocabulary.

The vocabulary projection is the largest single matmul for small models (SmolLM2:
576 x 49,152); computing it only where labels are trained skips the prompt and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneline.packing import IGNORE, collate


def unwrap(model):
    """The transformers *ForCausalLM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over answer tokens, and how many there are.

    Returning the sum (not the mean) lets callers weight every micro-batch and every
    device by its trainable tokens, so accumulation and DDP equal one big batch.
    """
    lm = unwrap(model)
    h = lm.base_model(                                   # backbone: LlamaModel / GPT2Model
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],          # (B, 1, T, T) block-diagonal causal
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state                                  # (B, T, C)
    target = batch["labels"][:, 1:]                      # position t predicts token t+1
    keep = target != IGNORE                              # (B, T-1)
    logits = lm.get_output_embeddings()(h[:, :-1][keep]).float()  # (N, V), N trained tokens
    return F.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def loss_totals(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[float, int]:
    """(summed answer-token loss, answer tokens) over packed rows, in eval mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        s, k = loss_sum(model, batch)
        total, n = total + float(s), n + k
    model.train(was_training)
    return total, n


def mean_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean answer loss over packed rows (validation loss; exp() = perplexity)."""
    total, n = loss_totals(model, rows, pad_id, batch_size)
    return total / max(n, 1)
