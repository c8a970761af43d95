"""Text → token ids: the task's template (a conversation's: tuneline/chat.py), the loss
mask (the trained spans), over-long examples, and the tokenizer's identity (so token data
never meets another tokenizer).

Used by tokenize (the training data) and by evaluation (the test rows, tokenized by each
model's own tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tuneline import tasks
from tuneline.data import TOKENIZED_META
from tuneline.errors import TunelineError
from tuneline.io import read_json
from tuneline.packing import IGNORE, Example

ENCODE_CHUNK = 2048  # examples per batched tokenizer call (tokenize reads its splits in such batches)


def tokenizer_hash(tok) -> str:
    """Content hash of the tokenizer (vocab, merges, normalizer, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def template_hash(tok) -> str:
    """Content hash of the chat template conversations are rendered in (tuneline/chat.py)."""
    from tuneline.chat import template

    return hashlib.sha256(template(tok).encode()).hexdigest()[:16]


def check_tokenizer(tok, meta: Path = TOKENIZED_META) -> None:
    """Refuse token data made with a different tokenizer (or chat template) than the one about to use it."""
    if not meta.is_file():
        return
    made = read_json(meta)
    if made["tokenizer_sha256"] != tokenizer_hash(tok) or made.get("chat_template_sha256", template_hash(tok)) != (
        template_hash(tok)
    ):
        raise TunelineError(
            f"{meta.parent} was made with a different tokenizer than model.name's",
            "re-run tokenization: dvc repro -f tokenize (tuneline run does this itself)",
        )


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one parallel Rust call (the transformers wrapper would
    build a Python BatchEncoding per text: ~40% of the time, for the same ids)."""
    if not tok.is_fast:
        return tok(texts, add_special_tokens=False)["input_ids"]
    # tuneline turns Rust-side threads off by default (they deadlock across forks); a batch
    # call in this process is safe, and the env var is read per call.
    backend = tok.backend_tokenizer
    # A padded `tok(..., padding=True)` call (generation does one) leaves padding switched
    # on in the backend; ids must never carry it.
    backend.no_padding()
    backend.no_truncation()
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


Spans = list[tuple[int, int]]  # an example's trained token ranges [a, b), in order


def encode_batch(tok, rows: list[dict], task: tasks.Task, labels: list[str]) -> tuple[list[list[int]], list[Spans]]:
    """(ids, trained spans) per row: prompt + answer + EOS, the answer and EOS trained, in
    one fast-tokenizer call for the prompts and one for the answers, not one per row. A chat
    row is its rendered conversation, every assistant turn trained (`chat.segments`)."""
    if task.chat:
        return _encode_chats(tok, rows)
    prompts, answers = zip(*(tasks.render(task, r, labels) for r in rows))
    p_ids, a_ids = encode(tok, list(prompts)), encode(tok, list(answers))
    eos = [tok.eos_token_id]
    return [p + a + eos for p, a in zip(p_ids, a_ids)], [[(len(p), len(p) + len(a) + 1)] for p, a in zip(p_ids, a_ids)]


def _encode_chats(tok, rows: list[dict]) -> tuple[list[list[int]], list[Spans]]:
    """Each piece of each rendered conversation tokenized on its own (one call for all), so
    the trained spans are exactly the assistant turns' text."""
    from tuneline import chat

    pieces = [chat.segments(tok, chat.turns(r)) for r in rows]
    flat = encode(tok, [text for p in pieces for text, _ in p])
    ids, spans, k = [], [], 0
    for p in pieces:
        x: list[int] = []
        trained: Spans = []
        for _, train in p:
            if train:
                trained.append((len(x), len(x) + len(flat[k])))
            x += flat[k]
            k += 1
        ids.append(x)
        spans.append(trained)
    return ids, spans


def answer_start(spans: Spans) -> int:
    """Where the (last) answer starts: what evaluation prompts with and scores after."""
    return spans[-1][0]


def label_ids(ids: list[int], spans: Spans) -> list[int]:
    """The labels of one example: its ids inside the trained spans, IGNORE elsewhere."""
    out = [IGNORE] * len(ids)
    for a, b in spans:
        out[a:b] = ids[a:b]
    return out


def encode_rows(tok, rows: list[dict], task: tasks.Task, labels: list[str]) -> list[Example]:
    """Examples with the loss masked to the answer (evaluation's test rows)."""
    ids, spans = encode_batch(tok, rows, task, labels)
    return [Example(x, label_ids(x, s)) for x, s in zip(ids, spans)]
