"""How a packed row's examples are kept apart in attention, per batch and device.

A packed row holds whole examples back to back (tuneline/packing.py). Each must attend to
itself only, causally, so that it gives the logits it gives alone. `attention_inputs`
picks one of three exact ways from the batch's segment ids (B, T) (1..k examples, 0 padding):
- every row one example filling it (`concat` blocks): no mask at all, so sdpa takes its
  causal path (flash attention on a GPU, no (T, T) mask built or read);
- a model switched to FLEX (`enable_flex`, done on CUDA): flex attention with a block mask
  built from the segment ids. 128 x 128 tiles wholly outside every example are skipped,
  so the work follows the examples' lengths, not T^2 (compiled by torch.compile);
- a model switched to SEGMENTS (`enable_segments`, done on the CPU): causal sdpa over
  each example alone. The batch's examples are gathered into groups of equal padded
  length (a multiple of BUCKET tokens) and each group is one sdpa call, so the work is
  about the sum of L^2 over examples, not T^2, and no mask is built (a 512-token row of
  ~45-token examples wasted ~90 % of its attention with the dense mask). On the CPU it
  runs in fp32: sdpa's bf16 kernels are about twice as slow as its fp32 ones at these
  sizes (measured: DEVELOPERS.md);
- otherwise: sdpa with the dense (B, 1, T, T) boolean block-diagonal mask.

FLEX and SEGMENTS are registered with transformers' AttentionInterface; a 4-D mask or a
BlockMask passes through the model untouched, and the per-example spans reach the
attention function as a keyword argument. Any other call (generation's 2-D padding masks:
transformers builds them as for sdpa) runs sdpa, so one model object trains, scores and
generates; on the CPU, such a call at inference with a mask runs `masked_inference`
(sdpa in fp32, grouped K/V heads read in place), with the fp32 results of transformers'
own path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLEX = "tuneline_flex"
SEGMENTS = "tuneline_segments"
BUCKET = 32  # SEGMENTS pads each example up to a multiple of this many tokens


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


def enable_flex(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to FLEX attention."""
    _register()
    model.set_attn_implementation(FLEX)


def enable_segments(model) -> None:
    """Switch `model` (a transformers PreTrainedModel) to per-example sdpa (SEGMENTS)."""
    _register()
    model.set_attn_implementation(SEGMENTS)


@dataclass(frozen=True)
class Segments:
    """A packed batch's examples, for `segments_forward`: one (idx, valid) pair per padded
    length L. idx (N, L) holds the flat positions (b * T + t) of N examples, each padded
    to L by repeating its last position; valid (N, L) marks the real ones. Causal attention
    never lets a real position see the padding after it, so the padding changes nothing."""

    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def segment_groups(seg: torch.Tensor, bucket: int = BUCKET) -> Segments:
    """The examples of a batch with segment ids `seg` (B, T), grouped by padded length."""
    B, T = seg.shape
    change = torch.ones_like(seg, dtype=torch.bool)  # (B, T): where a run of one id starts
    change[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = change.reshape(-1).nonzero().squeeze(1)  # (R,) flat; every row starts a run
    lens = torch.diff(starts, append=starts.new_tensor([B * T]))  # (R,)
    real = seg.reshape(-1)[starts] != 0  # id 0 is padding
    starts, lens = starts[real], lens[real]
    padded = (lens + bucket - 1) // bucket * bucket
    groups = []
    for L in padded.unique().tolist():
        pick = padded == L
        j = torch.arange(L, device=seg.device)  # (L,)
        n = lens[pick, None]  # (N, 1)
        groups.append((starts[pick, None] + torch.minimum(j, n - 1), j < n))  # (N, L) each
    return Segments(tuple(groups))


def attention_inputs(model, seg: torch.Tensor) -> dict:
    """The attention keyword arguments for a batch with segment ids `seg` (B, T)."""
    if bool((seg == 1).all()):  # one example per row, no padding: plain causal attention
        return {"attention_mask": None}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == FLEX:
        return {"attention_mask": block_mask(seg)}
    if impl == SEGMENTS:
        return {"attention_mask": None, "segments": segment_groups(seg)}
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


def segments_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments: Segments | None = None, **kwargs
):
    """transformers attention function: with `segments`, causal sdpa over each example
    alone, one call per group of equal padded length (padding positions get zeros: nothing
    reads them); without, plain sdpa. query (B, H, T, D), key/value (B, H_kv, T, D) ->
    ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None:
        if attention_mask is not None and not torch.is_grad_enabled() and kwargs.get("position_bias") is None:
            return masked_inference(query, key, value, attention_mask, scaling)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, T, D = query.shape
    work = torch.float32 if query.device.type == "cpu" else query.dtype  # fp32: faster here
    with torch.autocast(query.device.type, enabled=False):  # autocast would cast sdpa to bf16
        q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D).to(work) for x in (query, key, value))
        out = q.new_zeros(B * T, H, D)  # (B*T, H, D)
        for idx, valid in segments.groups:  # idx, valid (N, L)
            o = F.scaled_dot_product_attention(
                q[idx].transpose(1, 2),  # (N, H, L, D)
                k[idx].transpose(1, 2),
                v[idx].transpose(1, 2),
                is_causal=True,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=H != key.shape[1],
            )  # (N, H, L, D)
            out = out.index_put((idx[valid],), o.transpose(1, 2)[valid])
    return out.view(B, T, H, D).to(query.dtype), None


def masked_inference(query, key, value, attention_mask, scaling=None):
    """Attention at inference under a mask (generation's prefill and decoding with left
    padding, label branches after a prompt) on the CPU: sdpa in fp32, with grouped-query
    heads read in place. transformers' sdpa path runs it in bf16 under autocast and, with a
    mask, copies each K/V head once per query head; on these 2 cores that made attention
    ~30 % of a few-shot prompt's evaluation. Measured side by side on SmolLM2's shapes
    (9 query heads, 3 K/V heads): a decoding step over 200 cached positions, batch 64,
    9.5 ms -> 1.2 ms; a 45-token prefill 23 -> 19 ms (DEVELOPERS.md).
    query (B, H, T, D), key/value (B, H_kv, S, D), mask (B, 1, T, >= S) -> ((B, T, H, D), None)."""
    B, H, T, D = query.shape
    mask = attention_mask[:, :, :, : key.shape[-2]]
    if mask.dtype != torch.bool:
        mask = mask.float()  # an additive mask: sdpa wants the query's dtype
    with torch.autocast(query.device.type, enabled=False):
        out = F.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=mask, scale=scaling, enable_gqa=H != key.shape[1]
        )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX, flex_forward)
    AttentionInterface.register(SEGMENTS, segments_forward)
    for name in (FLEX, SEGMENTS):
        AttentionMaskInterface.register(name, sdpa_mask)  # 2-D masks (generation) are built as for sdpa
