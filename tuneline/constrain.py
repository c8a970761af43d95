"""Constrained decoding: answers made of exactly the input's words (`evaluate.constrain`).

`WordConstraint` lets each row emit only the words of its input, each as often as it
occurs there, separated by single spaces (one leading space allowed), and then EOS. It
works on bytes, under the tokenizer's pieces: the vocabulary's byte strings, sorted, are
walked together with the words still unused, so a word may come out in any BPE split
and nothing else can. The model still chooses the order and the split; the constraint
only takes away what would break the multiset of words.

Greedy decoding (`generation.decode`) and beam search (`beam.search`) ask it which tokens
each row may emit (`rule`); for greedy steps `allowed_logits` computes those logits and no
others (on the CPU in bf16, the output head's columns for them alone). As a transformers
`LogitsProcessor` (`processor`) it constrains `model.generate` the same way, and `generate`
is transformers' `custom_generate` entry point: `tuneline export` ships this file, as it is,
with an exported descrambler, so it imports nothing but the standard library, torch and
transformers.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter

import torch
import torch.nn.functional as F

SPACE = 0x20


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> its byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


@functools.cache
def vocabulary(tok) -> tuple[list[bytes], list[list[int]], dict[int, bytes]]:
    """The tokenizer's non-special tokens as (sorted distinct byte strings, their ids, each
    id's bytes).
    Byte-level BPE tokens (GPT-2, SmolLM2) map back to their exact bytes; other tokenizers'
    pieces are decoded to text one at a time (pieces that are part of a character do not
    decode alone, so such words may not be reachable there)."""
    special = set(tok.all_special_ids)
    vocab = {t: i for t, i in tok.get_vocab().items() if i not in special}
    dec = _byte_decoder()
    byte_level = all(c in dec for t in vocab for c in t)
    by_bytes: dict[bytes, list[int]] = {}
    for t, i in vocab.items():
        b = bytes(dec[c] for c in t) if byte_level else tok.convert_tokens_to_string([t]).encode()
        if b:
            by_bytes.setdefault(b, []).append(i)
    keys = sorted(by_bytes)
    return keys, [by_bytes[k] for k in keys], {i: k for k, ids in by_bytes.items() for i in ids}


class WordConstraint:
    """Per prompt, the words (whitespace-split) its answer must be made of."""

    def __init__(self, tok, sources: list[str]):
        self.tok = tok
        self.eos = tok.eos_token_id
        self.keys, self.ids, self.bytes = vocabulary(tok)
        self.words = [Counter(w.encode() for w in s.split()) for s in sources]
        self._states: dict = {}  # (row, prefix) -> state
        self._allowed: dict = {}  # state -> allowed ids (beams often reach one state)

    # --- one row ---------------------------------------------------------------------
    def _state(self, row: int, generated: list[int]):
        """(words still unused, the current word's bytes so far, started) after `generated`;
        None if `generated` already broke the constraint. Each step extends the previous
        step's prefix, so states are kept per prefix and computed from the parent's."""
        key = (row, tuple(generated))
        if key not in self._states:
            if not generated:
                state = (Counter(self.words[row]), b"", False)
            else:
                state = self._state(row, generated[:-1])
                for b in self.bytes.get(generated[-1], b""):  # special tokens: no bytes
                    if state is None:
                        break
                    state = self._step(*state, b)
            self._states[key] = state
        return self._states[key]

    @staticmethod
    def _step(left: Counter, word: bytes, started: bool, b: int):
        """The state after one more byte, or None if the byte is not allowed."""
        if b == SPACE:
            if word:  # a space ends the current word: one still unused, and not the last
                if left[word] <= 0 or sum(left.values()) <= 1:
                    return None
                left = left.copy()
                left[word] -= 1
                return left, b"", True
            return (left, b"", True) if not started else None  # one leading space only
        nxt = word + bytes([b])
        if not any(n > 0 and w.startswith(nxt) for w, n in left.items()):
            return None
        return left, nxt, True

    @staticmethod
    def _complete(left: Counter, word: bytes) -> bool:
        """Ending here uses every word exactly."""
        rest = left.copy()
        if word:
            if rest[word] <= 0:
                return False
            rest[word] -= 1
        return not any(n > 0 for n in rest.values())

    def allowed(self, row: int, generated: list[int]) -> list[int]:
        """The token ids row `row` may emit next, after `generated`."""
        state = self._state(row, generated)
        if state is None:
            return [self.eos]  # already off the words (cut by a length limit): stop
        left, word, started = state
        key = (frozenset((w, n) for w, n in left.items() if n > 0), word, started)
        if key not in self._allowed:
            self._allowed[key] = self._walk(left, word, started)
        return self._allowed[key]

    def _walk(self, left: Counter, word: bytes, started: bool) -> list[int]:
        """Every token whose bytes can come next: a walk over the byte strings s the
        constraint allows, extended while some token starts with s. Each node carries the
        unused words that still fit (`fits`: those starting with the current word's bytes),
        narrowed byte by byte, so a node looks at those words only, not at every word left."""
        out = [self.eos] if self._complete(left, word) else []
        fits = [w for w, n in left.items() if n > 0 and w.startswith(word)]
        # (s, words left, the current word's bytes, started, unused words starting with them)
        stack = [(b"", left, word, started, fits)]
        while stack:
            s, lft, wd, st, fits = stack.pop()
            if s:
                k = bisect.bisect_left(self.keys, s)
                if k == len(self.keys) or not self.keys[k].startswith(s):
                    continue  # no token starts with s
                if self.keys[k] == s:
                    out += self.ids[k]
            spaced = self._step(lft, wd, st, SPACE)  # `_step` decides whether a space may come here
            if spaced is not None:
                stack.append((s + b" ", *spaced, [w for w, n in spaced[0].items() if n > 0]))
            at, by_next = len(wd), {}
            for w in fits:  # the unused words that go on past wd, by their next byte
                if len(w) > at:
                    by_next.setdefault(w[at], []).append(w)
            for b, ws in by_next.items():
                stack.append((s + bytes([b]), lft, wd + bytes([b]), True, ws))
        return out or [self.eos]

    # --- a batch ---------------------------------------------------------------------
    def mask(self, rows: list[int], generated: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """logits (b, V) with every token that row `rows[j]` may not emit after
        `generated[j]` set to -inf."""
        return only(logits, [self.allowed(row, gen) for row, gen in zip(rows, generated)])

    def rule(self, prompts: list[int]):
        """`generation.decode`'s `constrain` for a batch whose row j is prompt `prompts[j]`:
        the ids each of its rows `rows` may emit after `generated`."""
        return lambda rows, generated: [self.allowed(prompts[r], gen) for r, gen in zip(rows, generated)]

    def processor(self, rows: list[int], prompt_len: int, num_beams: int):
        """A transformers LogitsProcessorList for `generate` over prompts `rows` (left-padded
        to `prompt_len`), each expanded to `num_beams` beams."""
        from transformers import LogitsProcessor, LogitsProcessorList

        constraint = self

        class _Words(LogitsProcessor):
            def __call__(self, input_ids, scores):  # (B * beams, t), (B * beams, V)
                beams = [rows[i // num_beams] for i in range(input_ids.shape[0])]
                return constraint.mask(beams, input_ids[:, prompt_len:].tolist(), scores)

        return LogitsProcessorList([_Words()])


# Model types whose logits are their output head over the last hidden state, with nothing
# after it (Gemma 2 soft-caps its logits, Granite scales them): a constrained step of these
# projects onto the allowed tokens only.
HEAD_LAST = ("gpt2", "llama")


def only(logits, allowed: list[list[int]]):
    """logits (b, V) with every token but row j's `allowed[j]` at -inf."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for j, ids in enumerate(allowed):
        keep[j, ids] = True
    return logits.masked_fill(~keep, float("-inf"))


def output_head(model):
    """(the output head's weight in bf16, room for rows of it) for `allowed_logits`, or None
    where a step runs the whole head. The columns alone are used on the CPU under bf16
    autocast, for models in HEAD_LAST whose head has no bias: there oneDNN's bf16 matmul
    gives each column the value the whole head gives it (every pick of the default job's
    evaluation, 800 answers, unchanged). In fp32, MKL's sgemm rounds some columns 1 ulp
    apart for other widths, which could flip a near tie: there, and on GPUs (where the
    head is cheap), the whole head runs. The weight is cast once, not its rows every step,
    and each step gathers its rows into the same room."""
    head = model.get_output_embeddings()
    if (
        model.config.model_type not in HEAD_LAST
        or not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or head.weight.device.type != "cpu"
        or not torch.is_autocast_enabled("cpu")
        or torch.get_autocast_dtype("cpu") != torch.bfloat16
    ):
        return None
    w = head.weight.detach().to(torch.bfloat16)
    return w, torch.empty_like(w)


def allowed_logits(model, head, x, allowed: list[list[int]], step: dict):
    """The next-token logits of one decoding step over x (b, 1) where row j may emit only
    `allowed[j]`: (logits (b, n), the n token ids they are for), every logit a row may not
    emit at -inf. The output head is the largest matmul of a step (SmolLM2: (b, 576) x
    (576, 49152), more than a decoder layer's), yet the word constraint leaves a few dozen
    tokens a row: with `head` (`output_head`), a step computes the head's columns of the
    tokens some row may emit (in ascending id order, so argmax breaks ties as over the whole
    vocabulary), and nothing else: the same picks (see `output_head` for where). Without
    it, the whole head's logits, masked."""
    if head is None:
        logits = model(input_ids=x, **step).logits[:, -1]  # (b, V)
        return only(logits, allowed), torch.arange(logits.shape[-1], device=x.device)
    vocab = sorted(set().union(*allowed))
    col = {t: c for c, t in enumerate(vocab)}
    # n rounded up to a power of two (the last id repeated, masked): oneDNN keeps a compiled
    # matmul per shape it sees, and one per step's n made the evaluate stage's peak RSS
    # 2.9 -> 3.8 GB.
    n = len(vocab)
    width = max(64, 1 << (n - 1).bit_length())
    ids = torch.tensor(vocab + vocab[-1:] * (width - n), device=x.device)  # (width,)
    h = model.base_model(input_ids=x, **step).last_hidden_state[:, -1]  # (b, H)
    weight, room = head
    logits = F.linear(h, torch.index_select(weight, 0, ids, out=room[:width]))  # (b, width)
    return only(logits, [[col[t] for t in row] for row in allowed])[:, :n], ids[:n]


def generate(model, words: list[str] | None = None, tokenizer=None, **kwargs):
    """transformers' `custom_generate` entry point. `tuneline export` ships this module, as
    it is, as an exported descrambler's `custom_generate/generate.py`, so that plain
    transformers keeps the answers to the input's words as `tuneline predict` does:
    `model.generate(**ids, custom_generate=FOLDER, trust_remote_code=True, tokenizer=tok,
    words=[text])`. With `words` (one string per prompt) each answer is made of exactly its
    string's words; without, this is plain `generate`. Every other argument is `generate`'s."""
    from transformers import GenerationMixin, LogitsProcessorList

    if words is not None:
        ids = kwargs.get("input_ids")
        ids = kwargs.get("inputs") if ids is None else ids  # (B, T), left-padded
        if tokenizer is None or ids is None or len(words) != ids.shape[0]:
            raise ValueError(
                "words= needs tokenizer= (the model's) and input_ids=, with one string of words per prompt"
            )
        beams = kwargs.get("num_beams") or (kwargs.get("generation_config") or model.generation_config).num_beams
        keep = WordConstraint(tokenizer, list(words)).processor(list(range(len(words))), ids.shape[1], beams or 1)
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), *keep])
    return GenerationMixin.generate(model, tokenizer=tokenizer, **kwargs)
