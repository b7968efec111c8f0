"""Answer extraction: the content of the last `\\boxed{...}` / `\\fbox{...}`, in linear time.

Brace matching is a single forward scan with a depth counter (no regular expressions), so a
megabyte of garbage or 100k nested braces costs one pass over the text.
"""

from __future__ import annotations

THINK_END = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def answer_region_after_think(response: str) -> str | None:
    """The text after the last `</think>`, or None when the response never closes its thinking."""
    idx = response.rfind(THINK_END)
    if idx < 0:
        return None
    return response[idx + len(THINK_END) :]


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped; None if absent.

    Also accepts the brace-less form `\\boxed 42` (up to the next `$` or end of line). A last box
    whose braces never close (a truncated response) yields None, as in the Hendrycks grader.
    """
    start, command = -1, ""
    for candidate in _BOX_COMMANDS:
        idx = text.rfind(candidate)
        if idx > start:
            start, command = idx, candidate
    if start < 0:
        return None
    pos = start + len(command)
    n = len(text)
    if pos < n and text[pos] == " " and text[pos:].lstrip(" ")[:1] not in ("{", ""):
        return _braceless_content(text, pos)
    while pos < n and text[pos] == " ":
        pos += 1
    if pos >= n or text[pos] != "{":
        return None
    end = matching_brace(text, pos)
    if end is None:
        return None
    return text[pos + 1 : end].strip()


def _braceless_content(text: str, pos: int) -> str | None:
    """`\\boxed 42$` form: everything up to `$` or a newline."""
    stop = len(text)
    for sep in ("$", "\n"):
        idx = text.find(sep, pos)
        if 0 <= idx < stop:
            stop = idx
    content = text[pos:stop].strip()
    return content or None


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
