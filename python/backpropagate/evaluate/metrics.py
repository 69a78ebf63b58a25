"""Answer scores against a reference, as reading-comprehension benchmarks (SQuAD) compute them.

Both texts are normalised first (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed), so "The Paris." matches "paris".
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """SQuAD's answer normalisation."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal."""
    return float(normalise(prediction) == normalise(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference appears in the normalised prediction (as whole words)."""
    ref = normalise(reference)
    return float(f" {ref} " in f" {normalise(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised texts' words."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORES = {"exact_match": exact_match, "contains": contains, "token_f1": token_f1}
