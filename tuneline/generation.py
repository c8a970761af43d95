"""Batched generation and scoring after a prompt, with one encoding of the prompt.

`prefill` encodes a left-padded batch of prompts once (KV cache, next-token logits,
positions); `score_branches` scores token lists after each cached prompt (a reference
answer, or every label's answer); `decode` continues greedily from the same cache, with
finished rows leaving the batch and optional exact prompt-lookup guesses, and
`beam.search` continues with beam search from it. `answer` runs
them over many prompts in length-sorted batches; `generate` returns the texts alone.
Used by tuneline/evaluation.py; tests check every path against one prompt at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneline import beam, progress
from tuneline.attention import dense_mask
from tuneline.constrain import allowed_logits, only, output_head
from tuneline.loss import unwrap


def answer_complete(tok, ids: list[int], marker: str | None) -> bool:
    """A greedy row is done once its answer (leading whitespace aside) holds `marker`: the
    rest would be cut anyway. None: only EOS ends it."""
    return marker is not None and marker in tok.decode(ids, skip_special_tokens=True).lstrip()


@torch.no_grad()
def prefill(model, input_ids, attention_mask, cache=None):
    """Encode a left-padded batch of prompts (B, T) once. Returns the KV cache, the logits of
    each row's next token (B, V) and that token's position (B, 1). Positions are what
    generate uses: the count of real tokens before, padding masked.

    `cache` may already hold a prefix shared by every row (`shared_prefix`): then
    attention_mask (B, P + T) covers it too, and only input_ids are encoded after it (the
    padding sits between the prefix and each prompt, masked, so positions run on)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    P = attention_mask.shape[1] - input_ids.shape[1]
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, P:]  # (B, T)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last position predicts: no vocabulary projection of the prompt
    ).logits[:, -1]  # (B, V)
    return cache, logits, pos[:, -1:] + 1


@torch.no_grad()
def shared_prefix(model, ids: list[int]):
    """The KV cache of one prefix (1, P) that every prompt of a batch starts with (a system
    turn, few-shot examples): encoded once, copied per batch by `prefix_cache`."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = torch.tensor([ids], device=model.device)
    model(input_ids=x, position_ids=torch.arange(len(ids), device=model.device)[None], past_key_values=cache)
    return cache


def prefix_cache(prefix, rows: int):
    """A fresh copy of `shared_prefix`'s cache for a batch of `rows` prompts."""
    import copy

    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(rows)
    return cache


@torch.no_grad()
def score_branches(model, state, attention_mask, branches: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Each row's branches (token lists: every label's answer, or the reference answer)
    scored after its prompt, from the prompt's cache (`state` = prefill's result): per row,
    each branch's summed log-probability. A row's branches follow its prompt side by side
    in one forward; each sees the prompt and itself only, at the positions it would have
    alone. The prompt is not encoded again, and the cache is left as prefill made it, so
    decoding can go on from it. Equals scoring prompt + branch as one sequence (tested)."""
    cache, last, next_pos = state  # last: (b, V) logits after each prompt
    lm = unwrap(model)
    dev = attention_mask.device
    width = max(sum(map(len, bs)) for bs in branches)
    x = torch.full((len(branches), width), pad_id, dtype=torch.long)  # (b, W) every branch back to back
    pos = torch.zeros_like(x)  # (b, W) position within the branch
    seg = torch.zeros_like(x)  # (b, W) branch 1..k, 0 padding
    at_b, at_t, target, owner, first = [], [], [], [], []  # per token after a branch's first: where it is predicted
    n = 0
    for i, bs in enumerate(branches):
        start = 0
        for j, branch in enumerate(bs, start=1):
            end = start + len(branch)
            x[i, start:end], pos[i, start:end], seg[i, start:end] = torch.tensor(branch), torch.arange(len(branch)), j
            first.append((i, branch[0]))
            at_b += [i] * (len(branch) - 1)
            at_t += range(start, end - 1)
            target += branch[1:]
            owner += [n] * (len(branch) - 1)
            start, n = end, n + 1
    x, pos, seg = x.to(dev), pos.to(dev), seg.to(dev)
    sees_prompt = attention_mask.bool()[:, None, None, :] & (seg > 0)[:, None, :, None]  # (b, 1, W, S)
    mask = torch.cat([sees_prompt, dense_mask(seg)], dim=-1)  # (b, 1, W, S + W); padding sees itself
    h = lm.base_model(
        input_ids=x, attention_mask=mask, position_ids=next_pos + pos, past_key_values=cache, use_cache=True
    ).last_hidden_state  # (b, W, C)
    cache.crop(-width)  # back to the prompts alone
    rows, tokens = (torch.tensor(c, device=dev) for c in zip(*first))
    sums = last.float().log_softmax(-1)[rows, tokens].double()  # (n,) each branch's first token
    if target:
        logits = lm.get_output_embeddings()(h[at_b, at_t]).float()  # (N, V): only the scored positions
        lp = -F.cross_entropy(logits, torch.tensor(target, device=dev), reduction="none")  # (N,)
        sums = sums.index_add(0, torch.tensor(owner, device=dev), lp.double())
    sums = sums.tolist()
    out = []
    for bs in branches:
        out.append(sums[: len(bs)])
        sums = sums[len(bs) :]
    return out


def lookup(context: list[int], k: int, ngram: int = 2) -> list[int]:
    """Prompt-lookup drafts: up to `k` tokens that followed the latest earlier occurrence of
    the context's last `ngram` (then fewer) tokens; [] when nothing matches. Answers that
    copy the prompt (descrambled words, a label listed in the prompt) match often."""
    for n in range(min(ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for s in range(len(context) - n - 1, -1, -1):
            if context[s : s + n] == tail:
                return context[s + n : s + n + k]
    return []


@torch.no_grad()
def decode(
    model,
    state,
    attention_mask,
    max_new_tokens: int,
    eos_id: int,
    done,
    prompts: list[list[int]] | None = None,
    draft: int = 0,
    constrain=None,
) -> list[list[int]]:
    """Greedy decoding from prefill's `state` for a left-padded batch: each row's new token
    ids, up to and including EOS or until `done(ids)` says its answer is complete.

    A finished row leaves the batch at once: its cache rows are dropped, so later steps
    compute only the rows still answering (transformers' generate keeps computing finished
    rows as padding until the last one ends; with answers of very different lengths that
    is most of the work).

    With `draft` > 0 and each row's prompt ids, a step also feeds up to `draft` guessed
    tokens per row (`lookup`: what followed the same tokens earlier in the prompt or the
    answer) and keeps those the model itself predicts, plus its next token: exact
    speculative decoding, several tokens for one forward when the guess is right. Rejected
    guesses stay in the cache, masked out; positions count kept tokens only. Every row's
    tokens are those it gets alone, up to floating-point ties: tests check them against
    generate.

    `constrain(rows, generated)`, if given, lists the token ids each of the batch's rows
    `rows` may emit after its `generated` ids (tuneline/constrain.py); every other token's
    logit is -inf (`allowed_logits`). It excludes guesses."""
    if constrain is not None and draft:
        raise ValueError("constrained decoding takes no prompt-lookup guesses")
    cache, logits, nxt_pos = state  # logits (b, V), nxt_pos (b, 1): b rows still answering
    dev = attention_mask.device
    if max_new_tokens <= 0:
        return [[] for _ in range(attention_mask.shape[0])]
    live = list(range(attention_mask.shape[0]))  # row of the batch behind each of the b rows
    new: list[list[int]] = [[] for _ in live]
    if constrain is not None:
        logits = only(logits, constrain(live, new))
    guess = logits.argmax(-1)[:, None].tolist()  # per row, the greedy tokens of the last forward
    head = output_head(model) if constrain is not None else None
    accepted = [1] * len(live)  # per row, how many of them are right (the first always is)
    while True:
        keep = []
        for j, i in enumerate(live):
            for t in guess[j][: accepted[j]]:
                new[i].append(t)
                if t == eos_id or done(new[i]) or len(new[i]) == max_new_tokens:
                    break
            else:
                keep.append(j)
        if not keep:
            return new
        if len(keep) < len(live):  # drop finished rows from everything the next step reads
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            attention_mask, nxt_pos = attention_mask[idx], nxt_pos[idx]
            live = [live[j] for j in keep]
        last = [new[i][-1] for i in live]  # emitted, not yet fed
        k = min(draft, *(max_new_tokens - len(new[i]) for i in live)) if draft and prompts else 0
        drafts = [lookup(prompts[i] + new[i], k) for i in live] if k else []
        k = max(map(len, drafts), default=0)
        x = torch.tensor(
            [[t, *d, *[eos_id] * (k - len(d))] for t, d in zip(last, drafts or [[]] * len(live))], device=dev
        )
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), k + 1)], dim=1)  # (b, S + k + 1)
        step = {
            "attention_mask": attention_mask,
            "position_ids": nxt_pos + torch.arange(k + 1, device=dev),
            "past_key_values": cache,
            "use_cache": True,
        }
        if constrain is None:
            g = model(input_ids=x, **step).logits.argmax(-1)  # (b, k + 1): the model's token after each fed one
        else:  # k == 0: the best of the tokens each row may emit
            logits, ids = allowed_logits(model, head, x, constrain(live, [new[i] for i in live]), step)  # (b, n), (n,)
            g = ids[logits.argmax(-1)][:, None]  # (b, 1)
        ok = (x[:, 1:] == g[:, :-1]).long().cumprod(-1).sum(-1)  # (b,) guesses right before the first miss
        guess, accepted = g.tolist(), (ok + 1).tolist()
        if k:  # mask out the rejected guesses' cache slots
            width = attention_mask.shape[1]
            attention_mask[torch.arange(width, device=dev) >= width - k + ok[:, None]] = 0
        nxt_pos = nxt_pos + ok[:, None] + 1


def greedy(model, input_ids, attention_mask, max_new_tokens: int, eos_id: int, done) -> list[list[int]]:
    """Greedy decoding with a KV cache for a left-padded batch (B, T): prefill, then decode."""
    return decode(model, prefill(model, input_ids, attention_mask), attention_mask, max_new_tokens, eos_id, done)


@torch.no_grad()
def answer(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    num_beams: int = 1,
    stop: str | None = "\n",
    branches: list[list[list[int]]] | None = None,
    lookup: int = 0,
    constraint=None,
    prefix: str = "",
    show: bool = True,
    stage: str = "evaluate",
) -> tuple[list[str], list[list[float]] | None, list[bool]]:
    """Greedy (or beam) completions of `prompts`, prompt stripped, cut at EOS and at the end
    of the answer, `stop` (Task.stop: one-line tasks the first newline, instruct the next
    `###` header, None for none).
    With `branches` (per prompt, token lists to score after it), also each branch's summed
    log-probability, from the same encoding of the prompt: the prompt is read once for both.
    `lookup` > 0: greedy decoding guesses that many tokens per step from the prompt (`decode`).
    `constraint` (a constrain.WordConstraint over `prompts`) limits what greedy and beam
    search may emit. `prefix` is text before every prompt (tuneline/prompting.py), encoded
    once and read from its cache by every batch. `show=False` prints no progress (a served
    request, register's parity check); `stage` labels it. Returns (answers, branch log-probabilities or None,
    per answer whether it ended: EOS or the stop marker, not cut at `max_new_tokens`)."""
    model.eval()
    tok.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at -1

    def done(ids: list[int]) -> bool:
        return answer_complete(tok, ids, stop)

    # Similar lengths share a batch: less padding, and a batch stops as soon as all its
    # (similarly long) answers are done.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    logps: dict[int, list[float]] = {}
    ended: dict[int, bool] = {}
    what = "generating" if branches is None else "generating and scoring"
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    shared = shared_prefix(model, pre) if pre else None
    with progress.bar(stage, len(prompts), "prompts", what=what, show=show) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T) the prompts after the prefix
            if pre:  # (B, P + T): the prefix, then each left-padded prompt
                mask = torch.cat([mask.new_ones(len(idx), len(pre)), mask], dim=1)
            cache = prefix_cache(shared, len(idx)) if shared is not None else None
            state = prefill(model, ids, mask, cache)
            if branches is not None:
                for i, lp in zip(idx, score_branches(model, state, mask, [branches[i] for i in idx], tok.pad_token_id)):
                    logps[i] = lp
            rule = None if constraint is None else constraint.rule(idx)
            if max_new_tokens == 0:  # scoring only
                new = [[] for _ in idx]
            elif num_beams == 1:
                unpadded = zip(ids, mask[:, len(pre) :].bool())
                own = [pre + row[m].tolist() for row, m in unpadded] if lookup else None
                new = decode(model, state, mask, max_new_tokens, tok.eos_token_id, done, own, lookup, rule)
            else:
                new = beam.search(model, state, mask, num_beams, max_new_tokens, tok.eos_token_id, rule)
            for i, row in zip(idx, new):
                text = tok.decode(row, skip_special_tokens=True).strip()  # chat-tuned models often open with a newline
                outs[i] = (text.split(stop)[0] if stop else text).strip()
                # Ended: EOS, the stop marker, or done before the budget; else it ran on and was cut.
                real = [t for t in row if t != tok.pad_token_id] if tok.pad_token_id != tok.eos_token_id else row
                ended[i] = (
                    max_new_tokens == 0
                    or tok.eos_token_id in row
                    or bool(stop and stop in text)
                    or len(real) < max_new_tokens
                )
            # prompts/s: a short answer's cost is its prompt's prefill, which a generated-tokens rate leaves out
            bar.advance(len(idx))
    return (
        [outs[i] for i in range(len(prompts))],
        None if branches is None else [logps[i] for i in range(len(prompts))],
        [ended[i] for i in range(len(prompts))],
    )


def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    num_beams: int = 1,
    stop: str | None = "\n",
    lookup: int = 0,
    constraint=None,
    show: bool = True,
) -> list[str]:
    """`answer`'s completions alone."""
    return answer(
        model,
        tok,
        prompts,
        max_new_tokens,
        batch_size,
        num_beams,
        stop,
        lookup=lookup,
        constraint=constraint,
        show=show,
    )[0]
