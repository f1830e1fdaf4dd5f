"""The final answer of a response: the content of its last ``\\boxed{...}``, and a key that tells answers apart."""

import re
from typing import Optional

BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed_answer(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with nested braces matched; None if absent or
    left open. Escaped braces (``\\{``, ``\\}``) do not count."""
    openings = list(BOX_OPENING.finditer(text))
    if not openings:
        return None
    start = openings[-1].end()
    depth, i = 1, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


# Spacing and sizing commands that change how an answer looks, not what it says.
LATEX_LAYOUT = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[,;:! ]|\$|\s")


def answer_key(answer: Optional[str]) -> str:
    """The answer as the memory compares it: its text without spacing or layout commands, ``\\dfrac``/``\\tfrac``
    read as ``\\frac``, a final period dropped. A response without a box gets "" (all such responses count as
    one answer). Text only: math-verify's equivalence (``0.5`` = ``\\frac{1}{2}``) runs sympy, which can take
    minutes on one answer, and the memory runs in the trainer's controller."""
    if answer is None:
        return ""
    return re.sub(r"\\[dt]frac", r"\\frac", LATEX_LAYOUT.sub("", answer)).rstrip(".")
