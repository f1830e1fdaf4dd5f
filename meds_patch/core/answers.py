"""The final answer of a response: the content of its last ``\\boxed{...}``."""

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
