"""Answer extraction with the semantics of miles' `math_utils.extract_answer` (miles@31f1ca961).

- `deepscaler_solution`: the text after the last `</think>`; without one, the text between the
  first and the second `###Response` (all of it after the first when there is no second); with
  neither marker, None (miles' `get_deepscaler_rule_based_reward`).
- `last_boxed_content`: None unless the text contains `\\boxed`. The LAST `\\boxed` is the one
  taken, even when a `\\fbox` comes later; `\\fbox` alone is never an answer. That `\\boxed` must be
  followed directly by `{` (`\\boxed {5}` and `\\boxed 5` are no answer), and the brace must close
  (a truncated box is no answer). The content is returned as written, not stripped.

Brace matching is a forward scan (no regular expressions), so a megabyte of garbage or 100k nested
braces costs one pass over the text.
"""

from __future__ import annotations

THINK_END = "</think>"
RESPONSE_MARKER = "###Response"
_BOX_OPEN = "\\boxed{"


def deepscaler_solution(response: str) -> str | None:
    """The part of `response` that deepscaler grades (see the module docstring), or None."""
    idx = response.rfind(THINK_END)
    if idx >= 0:
        return response[idx + len(THINK_END) :]
    first = response.find(RESPONSE_MARKER)
    if first < 0:
        return None
    start = first + len(RESPONSE_MARKER)
    second = response.find(RESPONSE_MARKER, start)
    return response[start:] if second < 0 else response[start:second]


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, unstripped; None if there is none."""
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith(_BOX_OPEN, start):
        return None
    open_pos = start + len(_BOX_OPEN) - 1
    end = matching_brace(text, open_pos)
    if end is None:
        return None
    return text[open_pos + 1 : end]


def matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the `{` at `open_pos`, or None if it never closes (linear)."""
    # Jump between brace characters with str.find (C speed); each cached position is only
    # searched again once the scan has passed it, so every character is looked at O(1) times.
    depth = 0
    next_open = open_pos
    next_close = text.find("}", open_pos)
    while next_close >= 0:
        if 0 <= next_open < next_close:
            depth += 1
            next_open = text.find("{", next_open + 1)
        else:
            depth -= 1
            if depth == 0:
                return next_close
            next_close = text.find("}", next_close + 1)
    return None


def max_brace_depth(text: str) -> int:
    """Deepest `{` nesting in `text` (unbalanced closing braces are ignored)."""
    depth = deepest = 0
    for ch in text:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}" and depth:
            depth -= 1
    return deepest
