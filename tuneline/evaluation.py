"""Scoring a model on test rows: generated answers, per-example answer losses,
constrained label scoring, the task's metrics, and paired comparisons of two models.

Used by the evaluate stage (base and tuned model), by register (a champion evaluated on
other examples is re-scored on these) and by `tuneline evaluate` (any model on any file).
Generation and the scoring that shares its prompt encoding are tuneline/generation.py.

A model's evaluation record (`ev`) is {"outputs", "nll", "tokens", "scored",
"generation_s"}: see tuneline/scoring.py.
"""

from __future__ import annotations

import hashlib
import json
import time

from tuneline import deps, progress, prompting, scoring, splits, tasks
from tuneline.config import Params
from tuneline.constrain import WordConstraint
from tuneline.generation import answer
from tuneline.hardware import autocast, device
from tuneline.io import read_json, write_json
from tuneline.loss import example_totals
from tuneline.modeling import cache_dir, identity, load_model, load_tokenizer
from tuneline.packing import concat, pack_groups
from tuneline.tokenization import answer_start, encode_batch, encode_rows

PRETRAIN_SAMPLES, PRETRAIN_PROMPT_WORDS = 8, 12  # continuations shown for pretraining
SCORE_BATCH = 4  # packed rows per forward when scoring losses


# The params that shape how a tuned model is scored on a split (validate and evaluate).
SCORING_PARAMS = (
    "seed",
    "model.name",
    "prepare.task",
    "prepare.labels",
    "tokenize.max_length",
    "tokenize.overlong",
    "tokenize.packing",
    "evaluate.batch_size",
    "evaluate.num_beams",
    "evaluate.precision",
    "evaluate.max_new_tokens",
    "evaluate.prompt_lookup",
    "evaluate.constrain",
    "evaluate.primary_metric",
)


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
    if not task.labelled:  # a conversation's branch is its last assistant turn
        ids, spans = encode_batch(tok, rows, task, labels)
        return [[x[answer_start(s) : s[-1][1]]] for x, s in zip(ids, spans)], [0] * len(rows)
    L = len(labels)
    ids, spans = encode_batch(tok, [r | {"label": lab} for r in rows for lab in labels], task, labels)
    plens = [answer_start(s) for s in spans]
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
    prompts, _ = prompts_and_targets(task, rows, labels, tok)
    branches, _ = answer_branches(tok, rows, task, labels)
    _, logp, _ = answer(model, tok, prompts, 0, params.evaluate.batch_size, branches=branches)
    return [labels[max(range(len(labels)), key=lp.__getitem__)] for lp in logp]


def fit_rows(
    tok, rows: list[dict], params: Params, limit: int | None, where: str = "evaluate"
) -> tuple[list[dict], int]:
    """The rows the model has positions for, under tokenize.overlong (the rule training
    uses), and how many were dropped. A row needs `limit` positions for its whole example
    (scored by teacher forcing) and for its prompt plus the answer budget (generation:
    the longest reference answer + 8, capped by evaluate.max_new_tokens); past them the
    position embedding has no row and generation crashes. 'error' stops, naming the row;
    'drop' and 'truncate' drop it (a cut test example cannot be scored against its
    reference), and the count is reported. When no row fits, it stops and says why."""
    from tuneline.errors import TunelineError

    task = tasks.TASKS[params.prepare.task]
    if limit is None or not rows or not task.generates:  # pretrain: scored in blocks of max_length
        return rows, 0
    budget = answer_budget(
        tok, prompts_and_targets(task, rows, params.prepare.labels, tok)[1], params.evaluate.max_new_tokens
    )
    ids, spans = encode_batch(tok, rows, task, params.prepare.labels)
    prompt_lens = [answer_start(s) for s in spans]
    fits = [len(x) <= limit and p + budget <= limit for x, p in zip(ids, prompt_lens)]
    n = fits.count(False)
    if n == 0:
        return rows, 0
    if n == len(rows):
        short = [p for x, p in zip(ids, prompt_lens) if len(x) <= limit and p < limit]
        if short:  # the examples fit; the answer budget after their prompts does not
            raise TunelineError(
                f"{where}: no example leaves room for the {budget}-token answer budget in the model's {limit} "
                f"positions (prompts of {min(short)} tokens and more)",
                f"lower evaluate.max_new_tokens to at most {limit - min(short)}",
            )
        raise TunelineError(
            f"{where}: all {n} examples are longer than the model's {limit} positions",
            "shorten the rows (e.g. prepare.max_words), or use a model with more positions",
        )
    first = fits.index(False)
    if params.tokenize.overlong == "error":
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


def test_rows(params: Params, split: str = "test") -> tuple[list[dict], int]:
    """The prepared test split (or `split`), fitted to the base model's positions (the tuned
    model is the same architecture): what evaluate scores and register compares on; validate
    scores the "val" split the same way."""
    from tuneline.data import read_split
    from tuneline.modeling import load_config, position_limit

    limit = position_limit(load_config(params.model.name))
    where = "evaluate" if split == "test" else "validate"
    return fit_rows(load_tokenizer(params.model.name), read_split(split), params, limit, where)


def prompts_and_targets(task: tasks.Task, rows: list[dict], labels: list[str], tok=None) -> tuple[list[str], list[str]]:
    """What each row asks and the reference answer (`tok`: the model's, for a chat task's template)."""
    if task.generates:
        return [list(x) for x in zip(*(tasks.render(task, r, labels, tok) for r in rows))]
    # Pretraining: continue the opening words of a few test paragraphs (shown, not scored).
    words = [r["text"].split() for r in rows[:PRETRAIN_SAMPLES]]
    return [" ".join(w[:PRETRAIN_PROMPT_WORDS]) for w in words], [
        " " + " ".join(w[PRETRAIN_PROMPT_WORDS:]) for w in words
    ]


def answer_budget(tok, targets: list[str], cap: int) -> int:
    """New tokens to generate, from the data: the longest reference answer plus slack, capped."""
    return min(cap, max(len(tok(t)["input_ids"]) for t in targets) + 8)


def evaluate_model(
    model, tok, rows: list[dict], params: Params, how: prompting.Prompting = prompting.PLAIN, stage: str = "evaluate"
) -> dict:
    """One model's evaluation record on `rows` (see tuneline/scoring.py): generated
    outputs, per-unit answer loss and tokens, and (classify/entail) log-likelihood labels.
    For a generating task, each prompt is encoded once for all three: the answer's loss and
    every label's likelihood are read from the cache generation starts from. `how` wraps
    each prompt (the base model's chat or few-shot prompting); the answers scored after it
    are the same tokens as trained. `stage` labels the progress bar."""
    cfg, task, labels = params.evaluate, tasks.TASKS[params.prepare.task], params.prepare.labels
    model = model.to(device())
    prompts, targets = prompts_and_targets(task, rows, labels, tok)
    max_new = answer_budget(tok, targets, cfg.max_new_tokens)
    branches, ref = answer_branches(tok, rows, task, labels) if task.generates else (None, None)
    words = WordConstraint(tok, [task.words(r) for r in rows]) if params.constrained() else None
    t = time.time()
    with autocast(cfg.precision):
        outputs, logp, ended = answer(
            model,
            tok,
            how.wrap(prompts),
            max_new,
            cfg.batch_size,
            cfg.num_beams,
            task.stop,
            branches,
            cfg.prompt_lookup,
            words,
            how.prefix,
            stage=stage,
        )
        gen_s = time.time() - t
        if logp is None:  # pretraining: blocks of the test text, scored as trained
            nll, tokens = example_nll(model, tok, rows, params)
        else:
            nll = [-lp[k] for lp, k in zip(logp, ref)]
            tokens = [len(bs[k]) for bs, k in zip(branches, ref)]
    scored = [labels[max(range(len(labels)), key=lp.__getitem__)] for lp in logp] if task.labelled else None
    # `ended`: whether each answer stopped by itself (EOS or the task's stop), not at the token
    # budget: the unterminated rate, a gate guardrail (scoring.py)
    ev = {"outputs": outputs, "nll": nll, "tokens": tokens, "scored": scored, "generation_s": gen_s}
    return ev | ({"ended": ended} if task.generates else {})


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
            params.constrained(),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _base_cache_key(rows: list[dict], params: Params, how: prompting.Prompting) -> str:
    """Base results depend only on the base model, the examples, the eval settings, the
    prompting and the code of the evaluate stage (the same import closure its DVC deps list)."""
    blob = json.dumps(
        [
            identity(params.model.name),  # a local folder: its files too, which can change under one name
            examples_key(rows, params),
            params.evaluate.batch_size,
            params.evaluate.prompt_lookup,  # exact in fp32, but bf16 rounds per batch shape
            [how.kind, how.prefix, how.before, how.after],
            deps.code_hash("evaluate"),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def base_promptings(rows: list[dict], params: Params, tok) -> list[prompting.Prompting]:
    """The ways to prompt the base model that evaluate.base_prompting asks for and that apply
    (tuneline/prompting.py); each one left out is said, with why."""
    from tuneline.modeling import load_config, position_limit

    task, limit = tasks.TASKS[params.prepare.task], position_limit(load_config(params.model.name))
    prompts = prompts_and_targets(task, rows, params.prepare.labels, tok)[0]
    found, skipped = prompting.candidates(params, tok, prompting.train_sample, prompts, limit)
    for why in skipped:
        print(f"[evaluate] base prompting left out, {why}", flush=True)
    return found


def evaluate_base(rows: list[dict], params: Params) -> dict[str, dict]:
    """The base model's record under each prompting that applies ({kind: record}), each
    computed once per key and kept in .cache/eval (a train-only change then re-scores only
    the tuned model)."""
    name, out, model = params.model.name, {}, None
    tok = load_tokenizer(name)
    for how in base_promptings(rows, params, tok):
        path = cache_dir().parent / "eval" / f"base-{_base_cache_key(rows, params, how)}.json"
        if path.is_file():
            print(f"[evaluate] base model, {how.kind} prompting: results reused from {path}", flush=True)
            out[how.kind] = read_json(path)
            continue
        print(f"[evaluate] base model, {how.kind} prompting", flush=True)
        model = model or load_model(name)
        out[how.kind] = evaluate_model(model, tok, rows, params, how)
        write_json(path, out[how.kind])
    return out


def load_any(ref: str):
    """(model, tokenizer) from a registry/run URI (models:/name@alias, models:/name/3,
    runs:/id/model) or anything model.name accepts (built-in name, local folder, hub id)."""
    from tuneline.store import in_store, use_store

    if in_store(ref):
        import mlflow

        from tuneline.errors import TunelineError

        use_store()
        try:
            if "transformers" in mlflow.models.get_model_info(ref).flavors:  # registered by older tuneline
                parts = mlflow.transformers.load_model(ref, return_type="components")
                model, tok = parts["model"].float(), parts["tokenizer"]
            else:  # tuneline/serving.py's Answerer
                served = mlflow.pyfunc.load_model(ref).unwrap_python_model()
                model, tok = served.model, served.tok
        except Exception as e:  # MlflowException, missing artifacts, not a model tuneline can read
            raise TunelineError(
                f"cannot load '{ref}' ({str(e).splitlines()[0][:120]})",
                "check the name/version/alias with `tuneline history` or the MLflow UI",
            ) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model, tok
    return load_model(ref), load_tokenizer(ref)


def evaluate_file(ref: str, params: Params, data: str, limit: int = 0, kind: str = "plain") -> dict:
    """Evaluate model `ref` on a file (or any prepare.source form) of the recipe's data shape:
    rows are validated, cleaned and templated exactly as prepare does for a test split.
    `kind`: how the prompts are given (tuneline/prompting.py), as evaluate gives them to the
    base model; a tuned model is prompted plain."""
    from tuneline.errors import TunelineError
    from tuneline.modeling import position_limit

    task = tasks.TASKS[params.prepare.task]
    rows, lineage = splits.file_rows(data, params, limit)
    model, tok = load_any(ref)
    positions = position_limit(model.config)
    rows, dropped = fit_rows(tok, rows, params, positions)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels, tok)
    how, why = prompting.one(kind, params, ref, tok, prompting.train_sample, prompts, positions)
    if how is None:
        raise TunelineError(
            f"--prompting {kind} does not apply to {ref}: {why}", "choose another (plain always applies)"
        )
    print(f"[evaluate] {ref} on {len(rows)} examples of {data}, {kind} prompting", flush=True)
    ev = evaluate_model(model, tok, rows, params, how)
    return {
        "model": ref,
        "prompting": kind,
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
