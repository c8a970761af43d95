"""Merge parity: the model that is registered must be the model that was trained.

train saves models/adapter (the LoRA weights) and models/merged (those weights folded into
the base model's), and everything after it (evaluate, register, serving) reads the merged
one. Merging is where fine-tuning tools' bugs hide: a lost scaling, a transposed Conv1D,
an adapter left out. Before register logs anything, `check` loads the base model with the
adapter and the merged model, reads the first `register.parity_prompts` test prompts with
each in fp32, and compares the largest absolute logit difference over every prompt
position, and the greedy answers. A mismatch is one line, and nothing is logged or
registered; the figures become the version's `parity.*` tags.
"""

from __future__ import annotations

import torch

from tuneline import tasks
from tuneline.config import Params
from tuneline.data import MODELS
from tuneline.errors import TunelineError

ADAPTER = MODELS / "adapter"


@torch.no_grad()
def compare(adapted, merged, tok, prompts: list[str], budget: int, stop: str | None) -> tuple[float, int]:
    """(largest |logit difference|, rows whose greedy answer is the same) of two models on
    `prompts`. The merged model answers greedily once; then both read each prompt with
    that answer in one forward (B, T). The adapted model gives the same greedy answer
    exactly when its argmax is that answer's next token at every answer position, so its
    own decoding need not run; the logits are compared over prompts and answers alike."""
    from tuneline.generation import answer_complete, greedy

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    new = greedy(
        merged,
        enc["input_ids"],
        enc["attention_mask"],
        budget,
        tok.eos_token_id,
        lambda ids: answer_complete(tok, ids, stop),
    )
    rows = [p[m.bool()].tolist() + n for p, m, n in zip(enc["input_ids"], enc["attention_mask"], new)]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) as generation counts them
    la, lb = (m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() for m in (adapted, merged))
    diff = float((la - lb).abs()[mask.bool()].max())
    same = 0
    for i, n in enumerate(new):  # the logits at T-1-len(n) .. T-2 predict the answer's tokens
        same += la[i, width - 1 - len(n) : width - 1].argmax(-1).tolist() == n
    return diff, same


def check(params: Params, rows: list[dict], merged) -> dict[str, str]:
    """The `parity.*` tags of the model in `merged` (a folder), or a TunelineError when it
    does not reproduce the adapted model on the first test `rows`."""
    if params.train.method != "lora":
        return {"parity": "not applicable: full fine-tuning saves the trained weights as they are"}
    from peft import PeftModel

    from tuneline.evaluation import answer_budget, prompts_and_targets
    from tuneline.modeling import load_model, load_tokenizer

    cfg, task = params.register, tasks.TASKS[params.prepare.task]
    fix = "re-run training to save the models again (`dvc repro -f train`)"
    if not (ADAPTER / "adapter_config.json").is_file():
        raise TunelineError(f"register: the LoRA adapter is missing from {ADAPTER}", fix)
    tok = load_tokenizer(merged)
    prompts, targets = prompts_and_targets(task, rows[: cfg.parity_prompts], params.prepare.labels, tok)
    adapted = PeftModel.from_pretrained(load_model(params.model.name), ADAPTER).eval()
    budget = answer_budget(tok, targets, params.evaluate.max_new_tokens)
    diff, agree = compare(adapted, load_model(merged).eval(), tok, prompts, budget, task.stop)
    print(
        f"[register] merge parity on {len(prompts)} test prompts: largest logit difference {diff:.3g} "
        f"(tolerance {cfg.parity_tol}), {agree}/{len(prompts)} greedy answers the same",
        flush=True,
    )
    wrong = [f"largest logit difference {diff:.3g} > register.parity_tol={cfg.parity_tol}"] * (
        not diff <= cfg.parity_tol  # a NaN difference fails too
    ) + [f"only {agree}/{len(prompts)} greedy answers the same"] * (agree < len(prompts))
    if wrong:
        raise TunelineError(f"register: the merged model does not reproduce the adapted one ({'; '.join(wrong)})", fix)
    return {
        "parity.max_logit_diff": f"{diff:.3g}",
        "parity.greedy_agree": f"{agree}/{len(prompts)}",
        "parity.tolerance": str(cfg.parity_tol),
    }
