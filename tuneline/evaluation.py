"""Scoring a model on test rows: batched generation, per-example answer losses,
constrained label scoring, the task's metrics, and paired comparisons of two models.

Used by the evaluate stage (base and tuned model), by register (a champion evaluated on
other examples is re-scored on these) and by `tuneline evaluate` (any model on any file).
Generation is batched: prompt-only inputs, left padding, KV cache, stop at EOS, greedy or
beam search; a test checks batched greedy outputs equal one-at-a-time ones.

A model's evaluation record (`ev`) is {"outputs", "nll", "tokens", "scored",
"generation_s"}: see tuneline/scoring.py.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch
import torch.nn.functional as F

from tuneline import deps, progress, scoring, splits, tasks
from tuneline.attention import dense_mask
from tuneline.config import Params
from tuneline.io import read_json, write_json
from tuneline.loss import example_totals, unwrap
from tuneline.modeling import autocast, cache_dir, device, load_model, load_tokenizer
from tuneline.packing import concat, pack_groups
from tuneline.tokenization import encode_batch, encode_rows

PRETRAIN_SAMPLES, PRETRAIN_PROMPT_WORDS = 8, 12  # continuations shown for pretraining
SCORE_BATCH = 4  # packed rows per forward when scoring losses


def answer_complete(tok, ids: list[int], marker: str) -> bool:
    """A greedy row is done once its answer (leading whitespace aside) holds `marker`: the
    rest would be cut anyway."""
    return marker in tok.decode(ids, skip_special_tokens=True).lstrip()


@torch.no_grad()
def prefill(model, input_ids, attention_mask):
    """Encode a left-padded batch of prompts (B, T) once. Returns the KV cache, the logits of
    each row's next token (B, V) and that token's position (B, 1). Positions are what
    generate uses: the count of real tokens before, padding masked."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
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
    generate."""
    cache, logits, nxt_pos = state  # logits (b, V), nxt_pos (b, 1): b rows still answering
    dev = attention_mask.device
    if max_new_tokens <= 0:
        return [[] for _ in range(attention_mask.shape[0])]
    live = list(range(attention_mask.shape[0]))  # row of the batch behind each of the b rows
    new: list[list[int]] = [[] for _ in live]
    guess = logits.argmax(-1)[:, None].tolist()  # per row, the greedy tokens of the last forward
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
        logits = model(
            input_ids=x,  # (b, k + 1)
            attention_mask=attention_mask,
            position_ids=nxt_pos + torch.arange(k + 1, device=dev),
            past_key_values=cache,
            use_cache=True,
        ).logits  # (b, k + 1, V)
        g = logits.argmax(-1)  # (b, k + 1): the model's token after each fed one
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
    one_line: bool = True,
    branches: list[list[list[int]]] | None = None,
    lookup: int = 0,
) -> tuple[list[str], list[list[float]] | None]:
    """Greedy (or beam) completions of `prompts`, prompt stripped, cut at EOS and at the end
    of the answer (one-line tasks: the first newline; instruct: the next `###` header).
    With `branches` (per prompt, token lists to score after it), also each branch's summed
    log-probability, from the same encoding of the prompt: the prompt is read once for both.
    `lookup` > 0: greedy decoding guesses that many tokens per step from the prompt (`decode`)."""
    model.eval()
    tok.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at -1
    marker = "\n" if one_line else "\n###"

    def done(ids: list[int]) -> bool:
        return answer_complete(tok, ids, marker)

    # Similar lengths share a batch: less padding, and a batch stops as soon as all its
    # (similarly long) answers are done.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    logps: dict[int, list[float]] = {}
    what = "generating" if branches is None else "generating and scoring"
    with progress.bar("evaluate", len(prompts), "prompts", what=what) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
            state = prefill(model, ids, mask) if branches is not None or num_beams == 1 else None
            if branches is not None:
                for i, lp in zip(idx, score_branches(model, state, mask, [branches[i] for i in idx], tok.pad_token_id)):
                    logps[i] = lp
            if max_new_tokens == 0:  # scoring only
                new = [[] for _ in idx]
            elif num_beams == 1:
                own = [row[m.bool()].tolist() for row, m in zip(ids, mask)] if lookup else None  # unpadded
                new = decode(model, state, mask, max_new_tokens, tok.eos_token_id, done, own, lookup)
            else:
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=num_beams,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                new = gen[:, ids.shape[1] :].tolist()  # (B, new_tokens): the prompt stripped
            for i, row in zip(idx, new):
                text = tok.decode(row, skip_special_tokens=True).strip()  # chat-tuned models often open with a newline
                outs[i] = text.split(marker)[0].strip()
            # the rate counts generated tokens (padding after a row's end is not work done)
            bar.advance(len(idx), tokens=sum(len([t for t in row if t != tok.pad_token_id]) for row in new))
    return [outs[i] for i in range(len(prompts))], (
        None if branches is None else [logps[i] for i in range(len(prompts))]
    )


def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    num_beams: int = 1,
    one_line: bool = True,
    lookup: int = 0,
) -> list[str]:
    """`answer`'s completions alone."""
    return answer(model, tok, prompts, max_new_tokens, batch_size, num_beams, one_line, lookup=lookup)[0]


def example_nll(model, tok, rows: list[dict], params: Params) -> tuple[list[float], list[int]]:
    """Per unit: summed answer-token loss and answer tokens (teacher forcing). A unit is an
    example, or for pretraining a concatenated block (scored as it is trained). Examples
    are packed for speed; bfd isolates them exactly (tested), so this equals one at a time."""
    examples = encode_rows(tok, rows, tasks.TASKS[params.prepare.task], params.prepare.labels)
    T = params.tokenize.max_length
    if params.tokenize.packing == "concat":
        totals = _scored(model, concat(examples, T, drop_remainder=False), tok.pad_token_id)
        units = [t for row in totals for t in row]
    else:
        packed, groups = pack_groups(examples, max(T, max(len(e.input_ids) for e in examples)), "bfd")
        units = [(0.0, 0)] * len(examples)
        for group, totals in zip(groups, _scored(model, packed, tok.pad_token_id)):
            for i, t in zip(group, totals):
                units[i] = t
    return [u[0] for u in units], [u[1] for u in units]


def _scored(model, packed: list[dict], pad_id: int) -> list[list[tuple[float, int]]]:
    """example_totals over packed rows, a few batches at a time so a bar can follow; the
    batches are the ones one call would make (SCORE_BATCH divides every chunk), so the
    numbers are too."""
    out: list[list[tuple[float, int]]] = []
    with progress.bar("evaluate", len(packed), "sequences", what="scoring") as bar:
        for i in range(0, len(packed), SCORE_BATCH * 8):
            chunk = packed[i : i + SCORE_BATCH * 8]
            out += example_totals(model, chunk, pad_id, SCORE_BATCH)
            bar.advance(len(chunk), tokens=sum(len(r["input_ids"]) for r in chunk))
    return out


def answer_branches(
    tok, rows: list[dict], task: tasks.Task, labels: list[str]
) -> tuple[list[list[list[int]]], list[int]]:
    """What is scored after each row's prompt, and which branch is the reference: the
    reference answer + EOS (its loss is the row's perplexity term) or, for a labelled task,
    every label's answer + EOS exactly as trained (constrained label scoring), the row's
    own label being the reference."""
    if not task.labelled:
        ids, plens = encode_batch(tok, rows, task, labels)
        return [[x[p:]] for x, p in zip(ids, plens)], [0] * len(rows)
    L = len(labels)
    ids, plens = encode_batch(tok, [r | {"label": lab} for r in rows for lab in labels], task, labels)
    branches = []
    for i in range(len(rows)):
        prompt = ids[i * L][: plens[i * L]]
        if any(ids[k][: plens[k]] != prompt for k in range(i * L, (i + 1) * L)):
            raise ValueError(f"task {task.name}: a prompt must not depend on the label it is scored against")
        branches.append([ids[k][plens[k] :] for k in range(i * L, (i + 1) * L)])
    return branches, [labels.index(r["label"]) for r in rows]


def score_labels(model, tok, rows: list[dict], params: Params) -> list[str]:
    """Constrained label scoring alone (evaluate_model does it while generating): the label
    whose verbalised answer is most likely given the prompt."""
    task, labels = tasks.TASKS[params.prepare.task], params.prepare.labels
    prompts, _ = prompts_and_targets(task, rows, labels)
    branches, _ = answer_branches(tok, rows, task, labels)
    _, logp = answer(model, tok, prompts, 0, params.evaluate.batch_size, branches=branches)
    return [labels[max(range(len(labels)), key=lp.__getitem__)] for lp in logp]


def fit_rows(
    tok, rows: list[dict], params: Params, limit: int | None, where: str = "evaluate"
) -> tuple[list[dict], int]:
    """The rows the model has positions for, under tokenize.overlong (the rule training
    uses), and how many were dropped. A row needs `limit` positions for its whole example
    (scored by teacher forcing) and for its prompt plus the answer budget (generation);
    past them the position embedding has no row and generation crashes. 'error' stops,
    naming the row; 'drop' and 'truncate' drop it (a cut test example cannot be scored
    against its reference), and the count is reported."""
    task = tasks.TASKS[params.prepare.task]
    if limit is None or not rows or not task.generates:  # pretrain: scored in blocks of max_length
        return rows, 0
    budget = params.evaluate.max_new_tokens
    ids, prompt_lens = encode_batch(tok, rows, task, params.prepare.labels)
    fits = [len(x) <= limit and p + budget <= limit for x, p in zip(ids, prompt_lens)]
    n = fits.count(False)
    if n == 0:
        return rows, 0
    first = fits.index(False)
    if params.tokenize.overlong == "error":
        from tuneline.errors import TunelineError

        raise TunelineError(
            f"{where}: {n} example(s) need more positions than the model has ({limit}); the first is example "
            f"{first + 1} ({len(ids[first])} tokens, prompt {prompt_lens[first]} + answer budget {budget})",
            "set tokenize.overlong: drop to skip them (they are counted), or shorten those rows",
        )
    print(
        f"[{where}] dropped {n} of {len(rows)} examples longer than the model's {limit} positions "
        f"(with the {budget}-token answer budget), first: example {first + 1}",
        flush=True,
    )
    return [r for r, ok in zip(rows, fits) if ok], n


def test_rows(params: Params) -> tuple[list[dict], int]:
    """The prepared test split, fitted to the base model's positions (the tuned model is the
    same architecture): what evaluate scores and register compares on."""
    from tuneline.data import read_split
    from tuneline.modeling import load_config, position_limit

    limit = position_limit(load_config(params.model.name))
    return fit_rows(load_tokenizer(params.model.name), read_split("test"), params, limit)


def prompts_and_targets(task: tasks.Task, rows: list[dict], labels: list[str]) -> tuple[list[str], list[str]]:
    if task.generates:
        return [list(x) for x in zip(*(tasks.render(task, r, labels) for r in rows))]
    # Pretraining: continue the opening words of a few test paragraphs (shown, not scored).
    words = [r["text"].split() for r in rows[:PRETRAIN_SAMPLES]]
    return [" ".join(w[:PRETRAIN_PROMPT_WORDS]) for w in words], [
        " " + " ".join(w[PRETRAIN_PROMPT_WORDS:]) for w in words
    ]


def evaluate_model(model, tok, rows: list[dict], params: Params) -> dict:
    """One model's evaluation record on `rows` (see tuneline/scoring.py): generated
    outputs, per-unit answer loss and tokens, and (classify/entail) log-likelihood labels.
    For a generating task, each prompt is encoded once for all three: the answer's loss and
    every label's likelihood are read from the cache generation starts from."""
    cfg, task, labels = params.evaluate, tasks.TASKS[params.prepare.task], params.prepare.labels
    model = model.to(device())
    prompts, targets = prompts_and_targets(task, rows, labels)
    # Budget from the data: the longest reference answer plus slack, capped.
    max_new = min(cfg.max_new_tokens, max(len(tok(t)["input_ids"]) for t in targets) + 8)
    branches, ref = answer_branches(tok, rows, task, labels) if task.generates else (None, None)
    t = time.time()
    with autocast(cfg.precision):
        outputs, logp = answer(
            model, tok, prompts, max_new, cfg.batch_size, cfg.num_beams, task.one_line, branches, cfg.prompt_lookup
        )
        gen_s = time.time() - t
        if logp is None:  # pretraining: blocks of the test text, scored as trained
            nll, tokens = example_nll(model, tok, rows, params)
        else:
            nll = [-lp[k] for lp, k in zip(logp, ref)]
            tokens = [len(bs[k]) for bs, k in zip(branches, ref)]
    scored = [labels[max(range(len(labels)), key=lp.__getitem__)] for lp in logp] if task.labelled else None
    return {"outputs": outputs, "nll": nll, "tokens": tokens, "scored": scored, "generation_s": gen_s}


def metrics_of(ev: dict, rows: list[dict], params: Params) -> dict[str, float]:
    task = tasks.TASKS[params.prepare.task]
    return scoring.metrics(task, rows, ev, params.prepare.labels) | {"generation_s": ev["generation_s"]}


def compare(a: dict, b: dict, rows: list[dict], params: Params, test: str = "bootstrap") -> scoring.Comparison:
    """Paired comparison of evaluation `a` with `b` on the same rows, on the primary metric."""
    task, metric = tasks.TASKS[params.prepare.task], params.primary_metric()
    a_stat, b_stat = (scoring.stat(task, metric, rows, ev, params.prepare.labels) for ev in (a, b))
    return scoring.compare(a_stat, b_stat, metric, test, params.evaluate.n_bootstrap, params.seed)


def examples_key(rows: list[dict], params: Params) -> str:
    """What makes two evaluations comparable example by example: the rows and every setting
    that shapes outputs or losses. Registered versions carry it (tag `eval.examples_key`)."""
    blob = json.dumps(
        [
            rows,
            params.prepare.task,
            params.prepare.labels,
            tasks.TEMPLATE_VERSION,
            params.tokenize.max_length,
            params.tokenize.packing,
            params.evaluate.model_dump(include={"num_beams", "max_new_tokens", "precision"}),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _base_cache_key(rows: list[dict], params: Params) -> str:
    """Base results depend only on the base model, the examples, the eval settings and the
    code of the evaluate stage (the same import closure its DVC deps list)."""
    blob = json.dumps(
        [
            params.model.name,
            examples_key(rows, params),
            params.evaluate.batch_size,
            params.evaluate.prompt_lookup,  # exact in fp32, but bf16 rounds per batch shape
            deps.code_hash("evaluate"),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def evaluate_base(rows: list[dict], params: Params) -> dict:
    """The base model's record, computed once per key and kept in .cache/eval (a train-only
    change then re-scores only the tuned model)."""
    path = cache_dir().parent / "eval" / f"base-{_base_cache_key(rows, params)}.json"
    if path.is_file():
        print(f"[evaluate] base results reused from {path}", flush=True)
        return read_json(path)
    name = params.model.name
    ev = evaluate_model(load_model(name), load_tokenizer(name), rows, params)
    write_json(path, ev)
    return ev


def load_any(ref: str):
    """(model, tokenizer) from a registry/run URI (models:/name@alias, models:/name/3,
    runs:/id/model) or anything model.name accepts (built-in name, local folder, hub id)."""
    if ref.split(":", 1)[0] in ("models", "runs", "mlflow-artifacts"):
        import mlflow

        from tuneline.errors import TunelineError
        from tuneline.tracking import check_store, tracking_uri

        check_store()
        mlflow.set_tracking_uri(tracking_uri())
        try:
            parts = mlflow.transformers.load_model(ref, return_type="components")
        except Exception as e:  # MlflowException, missing artifacts, not a transformers model
            raise TunelineError(
                f"cannot load '{ref}' ({str(e).splitlines()[0][:120]})",
                "check the name/version/alias with `tuneline history` or the MLflow UI",
            ) from None
        model, tok = parts["model"], parts["tokenizer"]
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.float(), tok
    return load_model(ref), load_tokenizer(ref)


def evaluate_file(ref: str, params: Params, data: str, limit: int = 0) -> dict:
    """Evaluate model `ref` on a file (or any prepare.source form) of the recipe's data shape:
    rows are validated, cleaned and templated exactly as prepare does for a test split."""
    task = tasks.TASKS[params.prepare.task]
    rows, lineage = splits.file_rows(data, params, limit)
    model, tok = load_any(ref)
    from tuneline.modeling import position_limit

    rows, dropped = fit_rows(tok, rows, params, position_limit(model.config))
    if not rows:
        from tuneline.errors import TunelineError

        raise TunelineError(f"every example of {data} is longer than the model has positions for", "shorten them")
    print(f"[evaluate] {ref} on {len(rows)} examples of {data}", flush=True)
    ev = evaluate_model(model, tok, rows, params)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels)
    return {
        "model": ref,
        "task": task.name,
        "data": lineage,
        "n_examples": len(rows),
        "n_dropped_overlong": dropped,
        "primary_metric": params.primary_metric(),
        "metrics": metrics_of(ev, rows, params),
        "predictions": [
            {"prompt": p, "target": t.strip(), "output": o} for p, t, o in zip(prompts, targets, ev["outputs"])
        ],
    }
