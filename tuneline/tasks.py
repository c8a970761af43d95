"""Tasks: everything that makes one kind of job differ from another, in one `Task` each.

A task says which columns a prepared row has, how a row becomes (prompt, answer), how
prose (the Wikipedia source) becomes rows, which metrics score it and how, what a served
request looks like (read by tuneline/request.py), and what its model card says it is (not)
for. Every stage reads these fields and nothing else about the task, so a new task is one
`Task(...)` passed to `register` (and a recipe that uses it).

Each shipped task is the public recipe it comes from; the prompt is masked out of the
loss and the answer (plus EOS, added by tokenize) is trained. Bump TEMPLATE_VERSION
whenever a template's text changes: tokenized data records it, so it can never silently
disagree.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tuneline import scoring

TEMPLATE_VERSION = 2


@dataclass(frozen=True)
class Task:
    name: str
    columns: tuple[str, ...]  # columns of a prepared row, read from the source
    optional: tuple[str, ...]  # columns that may be missing (filled with "")
    key: tuple[str, ...]  # what makes two rows the same example
    # (row, labels) -> the prompt text (not trained); None: the model's chat template renders it
    prompt: Callable[[dict, list[str]], str] | None
    answer: Callable[[dict], str]  # row -> the answer text (trained)
    metrics: tuple[str, ...]  # the first is the default primary metric
    # (metric, rows, evaluation, labels) -> per-example statistics (perplexity is common to all)
    score: Callable[[str, list[dict], dict, list[str]], scoring.Stat] | None = None
    # (texts, min_words, max_words) -> rows: how prose sources become rows (None: not accepted)
    prose: Callable[[list[str], int, int], list[dict]] | None = None
    # (row, rng) -> row with missing inputs made from the answer (descramble scrambles it)
    fill: Callable[[dict, random.Random], dict] | None = None
    # row -> the words its answer must be made of (evaluate.constrain: words), or None
    words: Callable[[dict], str] | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # (column, accepted other name): Dolly's names
    generates: bool = True  # scored by generation (pretrain: perplexity only)
    drops_blank: bool = False  # a blank row is left out, counted, not a bad row (corpora keep blank lines)
    chat: bool = False  # rows are conversations (column `messages`), rendered by tuneline/chat.py
    stop: str | None = "\n"  # an answer ends here (and at EOS): one-line answers at the newline
    # The columns a served request fills: a bare text fills the first ({prompt} in MLflow); a
    # request with named fields (a JSON object, a served frame's columns) may fill any of them.
    serve_fields: tuple[str, ...] = ()
    # request text -> the row it stands for, or ValueError naming the form (entail: a pair)
    serve_row: Callable[[str], dict] | None = None
    serve_example: str = ""  # a served request, logged with the model as its input example
    # a served request that fills every field (export checks its README example on it too;
    # chat's is a conversation)
    serve_filled: dict | None = None
    use: str = ""  # model card: what the model is for
    limits: str = ""  # model card: what it is not for

    @property
    def labelled(self) -> bool:
        """Rows carry a label from prepare.labels: constrained label scoring applies."""
        return "label" in self.columns


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` available as prepare.task (the shipped ones below, or your own)."""
    TASKS[task.name] = task
    return task


def render(task: Task, row: dict, labels: list[str], tok=None) -> tuple[str, str]:
    """(prompt, answer) text of one prepared row. A chat row's prompt is its conversation
    up to the last assistant turn in `tok`'s chat template, and that turn is the answer."""
    if task.chat:
        if tok is None:
            raise ValueError(f"task {task.name}: rendering a conversation needs the model's tokenizer")
        from tuneline import chat

        return chat.prompt_answer(tok, row)
    return task.prompt(row, labels), task.answer(row)


def normalise(text: str) -> str:
    return " ".join(text.split())


# --- descramble ---------------------------------------------------------------------------

# The seed recipe's prompt, lightly reworded. {source} is the scrambled sentence.
DESCRAMBLE_PROMPT = "Unscramble: {source}\nSentence:"
# A clean sentence: starts with a capital, plain words and light punctuation, ends with '.'
_CLEAN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-]*[a-z0-9)]\.$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def clean_sentences(texts: list[str], min_words: int, max_words: int) -> list[str]:
    """Unique sentences in first-seen order, min_words..max_words long."""
    seen: dict[str, None] = {}
    for text in texts:
        for para in text.split("\n"):  # a heading line never runs into the next sentence
            for sent in _SPLIT.split(" ".join(para.split())):
                n = len(sent.split())
                if min_words <= n <= max_words and _CLEAN.match(sent):
                    seen.setdefault(sent)
    return list(seen)


def scramble(sentence: str, rng: random.Random) -> str:
    """Shuffle words; re-shuffle (a few tries) so the input differs from the answer."""
    words = sentence.split()
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled)


def same_words(output: str, source: str) -> bool:
    """True when the output uses exactly the input's multiset of words."""
    return Counter(output.split()) == Counter(source.split())


def _descramble_score(metric: str, rows: list[dict], ev: dict, labels: list[str]) -> scoring.Stat:
    outs = [normalise(o) for o in ev["outputs"]]
    targets = [normalise(r["target"]) for r in rows]
    if metric == "exact_match":
        return scoring.mean([o == t for o, t in zip(outs, targets)])
    if metric == "multiset_rate":
        return scoring.mean([same_words(o, r["source"]) for o, r in zip(outs, rows)])
    return scoring.sacrebleu(metric, outs, targets)  # chrf, bleu


register(
    Task(
        "descramble",
        ("source", "target"),
        ("source",),
        ("target",),
        prompt=lambda r, _: DESCRAMBLE_PROMPT.format(source=r["source"]),
        # Leading space: BPE tokenizers then encode the answer exactly as they would mid-text.
        answer=lambda r: " " + r["target"],
        # chrF first (the default gate metric): at 135M scale exact match is rare, so a gate on
        # it could almost never tell two models apart.
        metrics=("chrf", "exact_match", "bleu", "multiset_rate", "perplexity"),
        score=_descramble_score,
        prose=lambda texts, lo, hi: [{"target": s} for s in clean_sentences(texts, lo, hi)],
        fill=lambda r, rng: r | {"source": r["source"] or scramble(r["target"], rng)},
        words=lambda r: r["source"],
        serve_fields=("source",),
        serve_example="cat the on sat mat the",
        use="Reorder the words of a shuffled English sentence into the original sentence.",
        limits="Trained on short (6-30 word) encyclopedic Wikipedia sentences; longer, informal or non-English "
        "text is out of scope. Outputs may drop, repeat or invent words: check `multiset_rate`.",
    )
)

# --- pretrain -----------------------------------------------------------------------------

register(
    Task(
        "pretrain",
        ("text",),
        (),
        ("text",),
        prompt=lambda r, _: "",
        answer=lambda r: r["text"],
        metrics=("perplexity",),
        prose=lambda texts, lo, hi: [{"text": t} for t in texts if len(t.split()) >= lo],
        generates=False,
        drops_blank=True,  # wikitext and other line-per-row corpora hold blank lines between paragraphs
        stop=None,
        serve_example="The history of the city",
        use="A small causal language model of encyclopedic English prose, for research and as a starting point.",
        limits="Trained on a small text sample: it is not factual, not instruction-following and not safe for "
        "user-facing generation.",
    )
)

# --- instruct -----------------------------------------------------------------------------


def instruct_prompt(row: dict) -> str:
    """Alpaca/Dolly headers; the Context block only when there is an input."""
    context = f"### Context:\n{row['input']}\n\n" if row.get("input") else ""
    return f"### Instruction:\n{row['instruction']}\n\n{context}### Response:\n"


def rouge_l(reference: Callable[[dict], str]):
    """ROUGE-L F1 (stemmed) of each generated answer against its row's `reference`."""

    def score(metric: str, rows: list[dict], ev: dict, labels: list[str]) -> scoring.Stat:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return scoring.mean([scorer.score(reference(r), o)["rougeL"].fmeasure for o, r in zip(ev["outputs"], rows)])

    return score


register(
    Task(
        "instruct",
        ("instruction", "input", "output"),
        ("input",),
        ("instruction", "input"),
        prompt=lambda r, _: instruct_prompt(r),
        answer=lambda r: r["output"],
        metrics=("rouge_l", "perplexity"),
        score=rouge_l(lambda r: r["output"]),
        aliases=(("input", "context"), ("output", "response")),
        stop="\n###",  # the next header: the model starting another instruction
        serve_fields=("instruction", "input"),
        serve_example="Name three primary colors.",
        serve_filled={"instruction": "Translate the sentence into French.", "input": "The cat is sleeping."},
        use="Follow short single-turn instructions in the Alpaca/Dolly format.",
        limits="A small model tuned on a few thousand examples: answers can be wrong or made up; no safety tuning.",
    )
)

# --- chat ---------------------------------------------------------------------------------


def _last_answer(row: dict) -> str:
    from tuneline.chat import last_turn

    return last_turn(row)[1]


register(
    Task(
        "chat",
        ("messages",),
        (),
        ("messages",),
        prompt=None,  # the model's chat template (tuneline/chat.py), every assistant turn trained
        answer=_last_answer,
        metrics=("rouge_l", "perplexity"),
        score=rouge_l(_last_answer),
        aliases=(("messages", "conversations"),),
        stop=None,  # the end-of-turn token (EOS) ends an answer; markdown headers may be in it
        chat=True,  # served: a user message, or a conversation ending with one (tuneline/chat.py `request`)
        serve_example="Name three primary colors.",
        serve_filled={
            "messages": [
                {"role": "user", "content": "Name a primary colour."},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Name another one."},
            ]
        },
        use="Answer in conversations (system, user and assistant turns) in the model's chat template.",
        limits="A small model tuned on a few thousand conversations: answers can be wrong or made up; no tool "
        "use, no safety tuning.",
    )
)

# --- classify, entail ---------------------------------------------------------------------

# Free generation (parsed), then constrained scoring (the most likely verbalised label).
CLASS_METRICS = ("accuracy", "macro_f1", "unparseable_rate", "scored_accuracy", "scored_macro_f1", "perplexity")


def parse_label(output: str, labels: list[str]) -> str | None:
    """The label a free-form answer starts with (case-insensitive, whole words), else None."""
    text = output.strip().lower()
    for label in sorted(labels, key=len, reverse=True):  # longest first: 'not sure' before 'not'
        low = label.lower()
        if text.startswith(low) and (len(text) == len(low) or not text[len(low)].isalnum()):
            return label
    return None


def label_score(metric: str, rows: list[dict], ev: dict, labels: list[str]) -> scoring.Stat:
    """Accuracy, macro-F1 and unparseable rate of generated labels; `scored_*` of the label
    that log-likelihood scoring picked; `accuracy[joy]`, the accuracy on one label's examples."""
    gold = [r["label"] for r in rows]
    preds = ev["scored"] if metric.startswith("scored_") else [parse_label(o, labels) for o in ev["outputs"]]
    if m := re.fullmatch(r"(?:scored_)?accuracy\[(.+)\]", metric):
        mine = np.array([g == m.group(1) for g in gold], dtype=float)
        right = np.array([p == g for p, g in zip(preds, gold)], dtype=float) * mine
        return scoring.Stat(np.stack([right, mine], 1), lambda s: float(s[0] / s[1]) if s[1] else math.nan)
    if metric.removeprefix("scored_") == "accuracy":
        return scoring.mean([p == g for p, g in zip(preds, gold)])
    if metric.removeprefix("scored_") == "macro_f1":
        return scoring.macro_f1(preds, gold, labels)
    return scoring.mean([p is None for p in preds])  # unparseable_rate


register(
    Task(
        "classify",
        ("text", "label"),
        (),
        ("text",),
        # Listing the options lets an untuned model answer with a label at all.
        prompt=lambda r, labels: f"Text: {r['text']}\nOptions: {', '.join(labels)}\nAnswer:",
        answer=lambda r: " " + r["label"],
        metrics=CLASS_METRICS,
        score=label_score,
        serve_fields=("text",),
        serve_example="i feel wonderful today",
        use="Label a short English text with one of the declared labels.",
        limits="Only the declared label set; accuracy on text unlike the training data (domain, length, language) "
        "is unknown. Where an answer must be a label, ask for the scored label (`tuneline predict --labels`, "
        'or the request param {"constrain": "labels"}).',
    )
)

# A served entail request: the MNLI line, its `mnli` and `target:` optional, either part first.
_PAIR = re.compile(
    r"\s*(?:mnli\s+)?(?:hypothesis:\s*(?P<h>.+?)\s+premise:\s*(?P<p>.+?)"
    r"|premise:\s*(?P<p2>.+?)\s+hypothesis:\s*(?P<h2>.+?))(?:\s+target:)?\s*",
    re.S | re.I,
)


def mnli_pair(text: str) -> dict:
    """The (premise, hypothesis) row of a served request `mnli hypothesis: … premise: …`."""
    if not (m := _PAIR.fullmatch(text)):
        raise ValueError("is not a hypothesis and a premise in the MNLI form")
    return {"premise": m["p"] or m["p2"], "hypothesis": m["h"] or m["h2"], "label": ""}


register(
    Task(
        "entail",
        ("premise", "hypothesis", "label"),
        (),
        ("premise", "hypothesis"),
        # The GPT-J/T5 MNLI format: `mnli hypothesis: … premise: … target: {label}<|endoftext|>`
        prompt=lambda r, _: f"mnli hypothesis: {r['hypothesis']} premise: {r['premise']} target:",
        answer=lambda r: " " + r["label"],
        metrics=CLASS_METRICS,
        score=label_score,
        # GLUE's and MultiNLI's own files (dev_matched.tsv, multinli_1.0_*.jsonl) name them so
        aliases=(("premise", "sentence1"), ("hypothesis", "sentence2"), ("label", "gold_label")),
        serve_fields=("premise", "hypothesis"),
        serve_row=mnli_pair,
        serve_example="mnli hypothesis: A man is outside. premise: A man walks in the park. target:",
        use="Decide whether a premise entails, contradicts or is neutral to a hypothesis (MNLI format).",
        limits="Genre and length shifts from MNLI lower accuracy; not a fact checker.",
    )
)
