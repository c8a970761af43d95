"""How a packed row's examples are kept apart in attention, per batch and device.

A packed row holds whole examples back to back (tuneline/packing.py). Each must attend to
itself only, causally, so that it gives the logits it gives alone. `attention_inputs`
picks one of three exact ways from the batch's segment ids (B, T) (1..k examples, 0 padding):
- every row one example filling it (`concat` blocks): no mask at all, so sdpa takes its
  causal path (flash attention on a GPU, no (T, T) mask built or read);
- a model switched to FLEX (`enable_flex`, done on CUDA): flex attention with a block mask
  built from the segment ids. 128 x 128 tiles wholly outside every example are skipped,
  so the work follows the examples' lengths, not T^2 (compiled by torch.compile);
- a model switched to SEGMENTS (`enable_segments`, done on the CPU): causal sdpa per
  example, over its own span of the row: the work is the sum of L^2 over examples, not
  T^2, and no mask is built (a 512-token row of ~45-token examples wasted ~90 % of its
  attention with the dense mask);
- otherwise: sdpa with the dense (B, 1, T, T) boolean block-diagonal mask.

FLEX and SEGMENTS are registered with transformers' AttentionInterface; a 4-D mask or a
BlockMask passes through the model untouched, and the per-example spans reach the
attention function as a keyword argument. Any other call (generation's 2-D padding masks:
transformers builds them as for sdpa) runs sdpa, so one model object trains, scores and
generates.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FLEX = "tuneline_flex"
SEGMENTS = "tuneline_segments"


def dense_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend key j: same segment and j <= i.
    Padding is a segment of its own, so every query sees at least itself (no NaN rows)."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()  # (T, T)
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def block_mask(seg: torch.Tensor):
    """The same rule as dense_mask, as a flex-attention BlockMask (computed per 128 x 128 tile)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_example(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv)

    B, T = seg.shape
    mask = create_block_mask(same_example, B, None, T, T, device=seg.device)
    mask.ndim = 4  # GPT-2's forward reads attention_mask.ndim; a 4-D mask is passed through as it is
    return mask


def use_flex(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == FLEX


def enable_flex(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to FLEX attention."""
    _register()
    model.set_attn_implementation(FLEX)


def enable_segments(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to per-example sdpa (SEGMENTS)."""
    _register()
    model.set_attn_implementation(SEGMENTS)


def spans(seg: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row, its runs of one segment id: (start, end, id); id 0 is padding."""
    out = []
    for row in seg.tolist():
        runs, start = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                runs.append((start, t, row[start]))
                start = t
        out.append(runs)
    return out


def attention_inputs(model, seg: torch.Tensor) -> dict:
    """The attention keyword arguments for a batch with segment ids `seg` (B, T)."""
    if bool((seg == 1).all()):  # one example per row, no padding: plain causal attention
        return {"attention_mask": None}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == FLEX:
        return {"attention_mask": block_mask(seg)}
    if impl == SEGMENTS:
        return {"attention_mask": None, "segments": spans(seg)}
    return {"attention_mask": dense_mask(seg)}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (B, H, T, D), key/value (B, H_kv, T, D) ->
    ((B, T, H, D), None). A BlockMask runs flex attention (compiled on CUDA; unfused, for
    tests, elsewhere); anything else runs sdpa."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    flex = _compiled_flex() if query.is_cuda else flex_attention
    out = flex(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def segments_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **kwargs):
    """transformers attention function: with `segments` (per row, (start, end, id) spans),
    causal sdpa over each example's own span (padding gets zeros: nothing reads it);
    without, plain sdpa. query (B, H, T, D), key/value (B, H_kv, T, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, runs in enumerate(segments):
        pieces = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                is_causal=True,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=gqa,
            )
            if k
            else query.new_zeros(1, query.shape[1], e - s, query.shape[3])
            for s, e, k in runs
        ]  # each (1, H, L, D)
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX, flex_forward)
    AttentionInterface.register(SEGMENTS, segments_forward)
    for name in (FLEX, SEGMENTS):
        AttentionMaskInterface.register(name, sdpa_mask)  # 2-D masks (generation) are built as for sdpa
