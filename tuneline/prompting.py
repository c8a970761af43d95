"""How evaluate prompts the base model (`evaluate.base_prompting`).

The base is often an instruct model: prompted with the bare task template it may not
answer at all, and a gate that promotes "better than the base model" must face the base
at its best. Three ways to prompt it:
- plain: the task's prompt, exactly as the tuned model is trained on it (for a chat task,
  the conversation in the model's own chat template: the only prompting that applies);
- chat: that prompt as the user turn of the tokenizer's chat template (when it has one),
  the answer starting where the template opens the assistant's turn;
- few_shot: k solved training examples (evaluate.base_shots), then the prompt. The shots
  come from the train split only, so a test example can never be its own hint.

Each is a `Prompting`: a `prefix` shared by every prompt, then per prompt `before` + the
plain prompt + `after`. Generation encodes the shared prefix once (tuneline/generation.py),
so a long few-shot or system prefix costs little. The prefix ends on a non-space
character (its trailing whitespace opens `before`): byte-level BPE never merges across
such a point, so the prefix's tokens followed by the prompt's are exactly the tokens of
the whole text. The tuned model is always prompted plain.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tuneline import tasks

KINDS = ("plain", "chat", "few_shot")
SHOT_SEP = "\n\n"  # between solved examples, and before the prompt
TRAIN_SAMPLE = 4096  # shots are drawn from the first rows of the (already shuffled) train split


@dataclass(frozen=True)
class Prompting:
    kind: str  # plain | chat | few_shot
    prefix: str = ""  # text before every prompt, encoded once (ends on a non-space)
    before: str = ""  # text before each prompt, after the prefix
    after: str = ""  # text after each prompt

    def wrap(self, prompts: list[str]) -> list[str]:
        """Each prompt with its own text around it (the prefix left out: it is shared)."""
        return [self.before + p + self.after for p in prompts]

    def texts(self, prompts: list[str]) -> list[str]:
        """The whole prompt texts: what the model reads."""
        return [self.prefix + p for p in self.wrap(prompts)]


def _made(kind: str, head: str, after: str = "") -> Prompting:
    """A Prompting whose shared prefix is `head` up to its trailing whitespace."""
    prefix = head.rstrip()
    return Prompting(kind, prefix, head[len(prefix) :], after)


PLAIN = Prompting("plain")


def chat(tok) -> Prompting | None:
    """The chat template around a user turn, split at the turn's content; None when the
    tokenizer has no template, or its rendering is not the same text around any content."""
    if not getattr(tok, "chat_template", None):
        return None
    sentinel = "\x00tuneline\x00"

    def render(content: str) -> str:
        turn = [{"role": "user", "content": content}]
        return tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

    text = render(sentinel)
    if text.count(sentinel) != 1:
        return None
    head, after = text.split(sentinel)
    probe = "Text: a b\nAnswer:"
    return _made("chat", head, after) if render(probe) == head + probe + after else None


def pick_shots(rows: list[dict], k: int, seed: int, task: tasks.Task) -> list[dict]:
    """k training rows, seeded. For a labelled task each label is shown once before any
    label is shown twice, so the shots do not all teach the commonest answer."""
    order = rows[:]
    random.Random(seed).shuffle(order)
    if task.labelled:
        first: dict[str, int] = {}  # label -> where it first occurs
        for i, r in enumerate(order):
            first.setdefault(r["label"], i)
        lead = sorted(first.values())
        order = [order[i] for i in lead] + [r for i, r in enumerate(order) if i not in set(lead)]
    return order[:k]


def few_shot(task: tasks.Task, shots: list[dict], labels: list[str]) -> Prompting:
    """Solved examples (prompt + answer, as trained) before the prompt."""
    solved = ["".join(tasks.render(task, r, labels)) for r in shots]
    return _made("few_shot", "".join(s + SHOT_SEP for s in solved))


def train_sample() -> list[dict]:
    """The first rows of the prepared train split (prepare shuffles it), read batch-wise so a
    corpus-scale split is not loaded to draw a few shots."""
    from tuneline.data import iter_split

    _, batches = iter_split("train", TRAIN_SAMPLE)
    return next(batches, [])


def candidates(
    params, tok, train: Callable[[], list[dict]], prompts: list[str] = (), limit: int | None = None
) -> tuple[list[Prompting], list[str]]:
    """The promptings evaluate.base_prompting asks for that apply to this task, tokenizer and
    training rows (`train()`, read only for few_shot), and whose `prompts` fit the model's
    `limit` positions with the answer budget; for each one left out, why. An explicit
    choice that does not apply is a one-line error."""
    cfg = params.evaluate
    wanted = KINDS if cfg.base_prompting == "auto" else (cfg.base_prompting,)
    out, skipped = [], []
    for kind in wanted:
        p, why = one(kind, params, params.model.name, tok, train, prompts, limit)
        if p is None:
            skipped.append(f"{kind}: {why}")
        else:
            out.append(p)
    if cfg.base_prompting != "auto" and skipped:
        from tuneline.errors import TunelineError

        raise TunelineError(
            f"evaluate.base_prompting '{cfg.base_prompting}' does not apply ({skipped[0]})",
            "set evaluate.base_prompting: auto (every way that applies) or plain"
            + (", or lower evaluate.base_shots" if "positions" in skipped[0] else ""),
        )
    return out, skipped


def one(
    kind: str, params, model: str, tok, train: Callable[[], list[dict]], prompts: list[str] = (), limit=None
) -> tuple[Prompting | None, str | None]:
    """Prompting `kind` for `model` (its tokenizer `tok`), or None and why it does not apply."""
    task, cfg = tasks.TASKS[params.prepare.task], params.evaluate
    if kind == "plain":
        return PLAIN, None
    if not task.generates:
        return None, f"{task.name} is scored on text blocks, with no prompt"
    if task.chat:  # plain is already the model's own chat template around the conversation
        return None, f"{task.name} prompts are conversations in the model's chat template already"
    if kind == "chat":
        p = chat(tok)
        if p is None:
            return None, f"{model}'s tokenizer has no chat template"
    elif cfg.base_shots == 0:
        return None, "evaluate.base_shots is 0"
    elif not (rows := train()):
        return None, "the train split is empty"
    elif not set(task.columns) <= set(rows[0]):  # `tuneline evaluate --recipe` of another task
        return None, f"the prepared train split holds no {task.name} rows (prepare with this recipe first)"
    else:
        p = few_shot(task, pick_shots(rows, cfg.base_shots, params.seed, task), params.prepare.labels)
    if prompts and not fits(p, tok, prompts, cfg.max_new_tokens, limit):
        return None, f"with it, prompts need more than the model's {limit} positions"
    return p, None


def fits(prompting: Prompting, tok, prompts: list[str], budget: int, limit: int | None) -> bool:
    """Whether every prompt, with its prefix, the text around it and the answer budget, has positions."""
    if limit is None or prompting is PLAIN:
        return True
    pre = len(tok(prompting.prefix, add_special_tokens=False)["input_ids"])
    longest = max(len(x) for x in tok(prompting.wrap(prompts), add_special_tokens=False)["input_ids"])
    return pre + longest + budget <= limit


def best(results: dict[str, dict[str, float]], metric: str) -> str:
    """The prompting whose results are best on `metric` (the first of KINDS on a tie)."""
    from tuneline.scoring import LOWER_IS_BETTER

    sign = -1 if metric in LOWER_IS_BETTER else 1
    return max(results, key=lambda kind: (sign * results[kind][metric], -KINDS.index(kind)))
