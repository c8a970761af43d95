"""Task templates: how a prepared row becomes (prompt, answer), and which metrics score it.

Each task is the public recipe it comes from; the prompt is masked out of the loss and the
answer (plus EOS, added by tokenize) is trained. Bump TEMPLATE_VERSION whenever a
template's text changes: tokenized data records it, so it can never silently disagree.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

TEMPLATE_VERSION = 2

# The seed recipe's prompt, lightly reworded. {source} is the scrambled sentence.
DESCRAMBLE_PROMPT = "Unscramble: {source}\nSentence:"


def descramble_prompt(source: str) -> str:
    return DESCRAMBLE_PROMPT.format(source=source)


def descramble_answer(target: str) -> str:
    # Leading space: BPE tokenizers then encode the answer exactly as they would mid-text.
    return " " + target


def instruct_prompt(row: dict) -> str:
    """Alpaca/Dolly headers; the Context block only when there is an input."""
    context = f"### Context:\n{row['input']}\n\n" if row.get("input") else ""
    return f"### Instruction:\n{row['instruction']}\n\n{context}### Response:\n"


def classify_prompt(row: dict, labels: list[str]) -> str:
    # Listing the options lets an untuned model answer with a label at all.
    return f"Text: {row['text']}\nOptions: {', '.join(labels)}\nAnswer:"


def entail_prompt(row: dict) -> str:
    # The GPT-J/T5 MNLI format: `mnli hypothesis: … premise: … target: {label}<|endoftext|>`
    return f"mnli hypothesis: {row['hypothesis']} premise: {row['premise']} target:"


@dataclass(frozen=True)
class Task:
    name: str
    columns: tuple[str, ...]          # columns of a prepared row, read from the source
    optional: tuple[str, ...]         # columns that may be missing (filled with "")
    key: tuple[str, ...]              # what makes two rows the same example
    prompt: Callable[[dict, list[str]], str]
    answer: Callable[[dict], str]
    metrics: tuple[str, ...]          # the first is the default primary metric
    aliases: tuple[tuple[str, str], ...] = ()  # (column, accepted other name): Dolly's names
    generates: bool = True            # scored by generation (pretrain: perplexity only)
    one_line: bool = True             # answers are one line: generation is cut at a newline
    serve_field: str | None = None    # the column a served request fills ({prompt} in MLflow)


# Free generation (parsed), then constrained scoring (the most likely verbalised label).
CLASS_METRICS = ("accuracy", "macro_f1", "unparseable_rate", "scored_accuracy", "scored_macro_f1", "perplexity")

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("descramble", ("source", "target"), ("source",), ("target",),
         lambda r, _: descramble_prompt(r["source"]), lambda r: descramble_answer(r["target"]),
         # chrF first (the default gate metric): at 135M scale exact match is rare, so a
         # gate on it could almost never tell two models apart.
         ("chrf", "exact_match", "bleu", "multiset_rate", "perplexity"), serve_field="source"),
    Task("pretrain", ("text",), (), ("text",), lambda r, _: "", lambda r: r["text"],
         ("perplexity",), generates=False, one_line=False),
    Task("instruct", ("instruction", "input", "output"), ("input",), ("instruction", "input"),
         lambda r, _: instruct_prompt(r), lambda r: r["output"], ("rouge_l", "perplexity"),
         aliases=(("input", "context"), ("output", "response")), one_line=False, serve_field="instruction"),
    Task("classify", ("text", "label"), (), ("text",), lambda r, labels: classify_prompt(r, labels),
         lambda r: " " + r["label"], CLASS_METRICS),
    Task("entail", ("premise", "hypothesis", "label"), (), ("premise", "hypothesis"),
         lambda r, _: entail_prompt(r), lambda r: " " + r["label"], CLASS_METRICS),
)}

# Metrics where lower is better (the gate and the deltas need to know).
LOWER_IS_BETTER = {"perplexity", "unparseable_rate"}


def serving_template(task: Task, labels: list[str]) -> str:
    """The prompt with MLflow's `{prompt}` placeholder where a served request goes (entail
    takes the whole `mnli hypothesis: … premise: … target:` line as the request)."""
    if task.serve_field is None:
        return "{prompt}"
    row = {c: "" for c in task.columns} | {task.serve_field: "{prompt}"}
    return task.prompt(row, labels)


def render(task: Task, row: dict, labels: list[str]) -> tuple[str, str]:
    """(prompt, answer) text of one prepared row."""
    return task.prompt(row, labels), task.answer(row)


def scramble(sentence: str, rng: random.Random) -> str:
    """Shuffle words; re-shuffle (a few tries) so the input differs from the answer."""
    words = sentence.split()
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled)


def normalise(text: str) -> str:
    return " ".join(text.split())


def same_words(output: str, source: str) -> bool:
    """True when the output uses exactly the input's multiset of words."""
    return Counter(output.split()) == Counter(source.split())


def parse_label(output: str, labels: list[str]) -> str | None:
    """The label a free-form answer starts with (case-insensitive, whole words), else None."""
    text = output.strip().lower()
    for label in sorted(labels, key=len, reverse=True):  # longest first: 'not sure' before 'not'
        low = label.lower()
        if text.startswith(low) and (len(text) == len(low) or not text[len(low)].isalnum()):
            return label
    return None
