"""Scoring a short answer as SQuAD does: exact match and token F1 after normalisation.

    normalize("The weather in Ashford is usually Rainy.")  # -> "weather in ashford is usually rainy"
    exact_match("Halra lives in Evergate.", "halra lives in evergate")   # -> 1.0
    token_f1("Halra lives in Caldford.", "Halra lives in Evergate.")     # -> 0.75

Normalisation (SQuAD v1.1's evaluation script): lower case, drop punctuation, drop the articles
a/an/the, collapse spaces. F1 counts the tokens both answers share, so it gives part credit (to
"great oak" for "oak"). Step 5 scores the short answer, the value a question asks for, as SQuAD
scores an answer span (eval_retrieval.py).
"""
import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
