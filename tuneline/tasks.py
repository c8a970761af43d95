"""Task templates: how a prepared row becomes (prompt, answer), and how answers are scored.

Bump TEMPLATE_VERSION whenever a template's text changes: the tokenize stage is keyed on
it, so cached token data can never silently disagree with the template.
"""

from __future__ import annotations

import random
from collections import Counter

TEMPLATE_VERSION = 1

# The seed recipe's prompt, lightly reworded. {source} is the scrambled sentence.
DESCRAMBLE_PROMPT = "Unscramble: {source}\nSentence:"


def descramble_prompt(source: str) -> str:
    return DESCRAMBLE_PROMPT.format(source=source)


def descramble_answer(target: str) -> str:
    # Leading space: BPE tokenizers then encode the answer exactly as they would mid-text.
    return " " + target


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
