"""Beam search from one encoding of each prompt, with finished rows leaving the batch.

`search` continues from `generation.prefill`'s state: each prompt is encoded once and its
KV cache copied to its beams, where transformers' `generate` encodes every prompt once per
beam (the prompt of a descrambled sentence is as long as its answer). A row whose best
answer can no longer change leaves the batch at once, instead of being carried as padding
until the batch's last row ends.

The search itself is transformers 5's (`GenerationMixin._beam_search`, its defaults:
length_penalty 1.0, early_stopping False), so the answers are the ones `generate` gives
(tested on a tiny model in fp32):
- each step, a row's 2k best continuations over its k beams, by summed log-probability
  (log_softmax over the whole vocabulary, then the constraint's mask);
- those that end (EOS, or the token budget) among the first k enter the row's k finished
  hypotheses, scored by sum / length ** length_penalty; the best k that do not end run on;
- a row is done once its k finished hypotheses are all better than its best running
  beam's sum over the current length (transformers' heuristic for early_stopping=False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneline.constrain import only

NEG = -1.0e9  # transformers' score for a slot that must not be picked (finite: it stays comparable)


@torch.no_grad()
def search(
    model,
    state,
    attention_mask,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    constrain=None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search for a left-padded batch (B, T) from prefill's `state`: each row's best
    hypothesis, its new token ids up to and including EOS (or `max_new_tokens` of them).
    `constrain(rows, generated)` lists the ids each beam may emit (as in `generation.decode`).
    The cache in `state` is consumed (expanded to the beams)."""
    cache, logits, nxt_pos = state  # logits (B, V) after each prompt, nxt_pos (B, 1)
    k, rows = num_beams, logits.shape[0]
    if max_new_tokens <= 0:
        return [[] for _ in range(rows)]
    cache.batch_repeat_interleave(k)  # every row's prompt, once per beam: (B * k, ...)
    mask, pos = attention_mask.repeat_interleave(k, 0), nxt_pos.repeat_interleave(k, 0)
    logits = logits.repeat_interleave(k, 0)  # (b * k, V)
    live = list(range(rows))  # the batch row behind each of the b rows still searching
    beams = [[[] for _ in range(k)] for _ in live]  # per live row, its k running beams' tokens
    scores = torch.full((rows, k), NEG, device=logits.device)  # (b, k) summed log-probabilities
    scores[:, 0] = 0  # one beam to start from, or the first step would pick the same token k times
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in live]  # per batch row, best first
    for t in range(max_new_tokens):  # t tokens generated so far
        lp = F.log_softmax(logits.float(), dim=-1)  # (b * k, V)
        if constrain is not None:
            lp = only(lp, constrain([r for r in live for _ in range(k)], [g for bs in beams for g in bs]))
        b, V = scores.shape[0], lp.shape[-1]
        top, idx = (lp.view(b, k, V) + scores[:, :, None]).view(b, k * V).topk(2 * k, dim=-1)  # (b, 2k)
        src, tok = idx // V, idx % V  # which beam each continuation extends, with which token
        ends = (tok == eos_id) | (t + 1 >= max_new_tokens)  # (b, 2k)
        run = top + ends.float() * NEG  # (b, 2k) an ended continuation does not run on
        nxt = run.topk(k, dim=-1).indices  # (b, k) the beams of the next step, best first
        scores = run.gather(1, nxt)
        done_score = (top / (t + 1) ** length_penalty).tolist()  # as a finished hypothesis
        src_l, tok_l, ends_l, nxt_l, top_l = src.tolist(), tok.tolist(), ends.tolist(), nxt.tolist(), top.tolist()
        best = (scores[:, 0] / (t + 1) ** length_penalty).tolist()  # the best a running beam may still reach
        keep = []
        for j, r in enumerate(live):
            for c in range(k):  # only the k best continuations may end the row's search
                if ends_l[j][c] and top_l[j][c] > float("-inf"):  # -inf: fewer tokens were allowed
                    finished[r].append((done_score[j][c], beams[j][src_l[j][c]] + [tok_l[j][c]]))
            finished[r] = sorted(finished[r], key=lambda h: -h[0])[:k]  # stable: earlier ones first on ties
            worst = finished[r][-1][0] if len(finished[r]) == k else NEG
            if best[j] > worst and not all(ends_l[j]):
                keep.append(j)
        if not keep:
            break
        # The next step's rows: kept rows' chosen beams, each from the beam it extends.
        pick = [(j, nxt_l[j][c]) for j in keep for c in range(k)]
        idx = torch.tensor([j * k + src_l[j][c] for j, c in pick], device=mask.device)
        cache.batch_select_indices(idx)
        beams = [[beams[j][src_l[j][c]] + [tok_l[j][c]] for c in nxt_l[j]] for j in keep]
        live, scores = [live[j] for j in keep], scores[torch.tensor(keep, device=scores.device)]
        x = torch.tensor([[tok_l[j][c]] for j, c in pick], device=mask.device)  # (b * k, 1)
        mask = torch.cat([mask[idx], mask.new_ones(len(pick), 1)], dim=1)
        pos = pos[idx]
        logits = model(
            input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        ).logits[:, -1]
        pos = pos + 1
    return [finished[r][0][1] for r in range(rows)]
