"""The two answer normalizations of miles' `math_utils` (miles@31f1ca961), reimplemented.

- `mathd_normalize` (miles `mathd_normalize_answer` / `_strip_string`, Hendrycks MATH): strip,
  unwrap a whole-answer `\\text{...}`, then: drop newlines and `\\!`, `\\\\`->`\\`, tfrac/dfrac->frac,
  drop `\\left`/`\\right`, `^{\\circ}`/`^\\circ`, `\\$`; cut at `\\text{ ` (units; an answer with two
  of them is left as it was); drop `\\%`; ` .`->` 0.`, `{.`->`{0.`, leading `.`->`0.`; `lhs=rhs`
  becomes `rhs` when `lhs` (spaces included) has at most 2 characters; `\\sqrtX`->`\\sqrt{X}` (any
  character X); spaces removed; `\\frac12`->`\\frac{1}{2}`; `0.5`->`\\frac{1}{2}`; `a/b` with integer
  literals that print back unchanged -> `\\frac{a}{b}`. A step that fails (a trailing `\\sqrt` or
  `\\frac`) leaves the answer as it was after the strip and unwrap.
- `sympy_normalize` (miles `_normalize`): plain text for `grade_answer_sympy`: unwrap `\\text{}`,
  drop `$`/`%`, ` or `/` and `->` , `, million/billion/trillion -> `*10^k`, delete the unit words
  of `UNIT_WORDS` ANYWHERE (no word boundaries: `Monday` -> `Mon`), `^\\circ`, one pair of outer
  braces, `,\\!`; a float-parsable integer becomes `str(int(round(float)))` (so 20-digit integers
  compare after float rounding, as in miles); LaTeX -> text (`latex_to_plain`, which stands in for
  miles' pylatexenc); `- `->`-`; `digit spaces digit` -> `digit+digit` (mixed numbers);
  spaces and braces dropped; lower case; integer-valued text -> `str(int(float))`.
"""

from __future__ import annotations

import re

UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
    "month", "year", "foot", "feet", "inch", "yard",
)
_UNIT_RES = tuple(re.compile(word + r"(es)?(s)? *(\^[0-9]+)?") for word in UNIT_WORDS)
_WHOLE_TEXT_RE = re.compile(r"^\\text\{(?P<text>.+?)\}$")
_CIRC_RE = re.compile(r"\^ *\\circ")
_THIN_COMMA_RE = re.compile(r",\\! *")
_MINUS_RE = re.compile(r"- *")
_MIXED_NUMBER_RE = re.compile(r"([0-9]) +([0-9])")
_FORMATTED_COMMA_RE = re.compile(r"(\d),(\d\d\d)($|\D)")
_FRAC_SHAPE_RE = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_TUPLE_CHARS = "()[]"


class _Unnormalizable(Exception):
    """A `_strip_string` step that miles lets raise; the caller falls back to the raw answer."""


def mathd_normalize(answer: str) -> str:
    """Hendrycks MATH normalization as miles' `mathd_normalize_answer` does it."""
    answer = answer.strip()
    match = _WHOLE_TEXT_RE.search(answer)
    if match is not None:
        answer = match.group("text").strip()
    try:
        return _strip_string(answer)
    except _Unnormalizable:
        return answer


def _strip_string(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _Unnormalizable
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _brace_sqrt_arguments(s).replace(" ", "")
    s = _brace_frac_arguments(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def _brace_sqrt_arguments(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`: the one character after `\\sqrt` is braced, whatever it is."""
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalizable
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _brace_frac_arguments(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{7}` -> `\\frac{1}{7}`; unchanged if a `\\frac` has < 2 chars."""
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalizable
        out.append("\\frac")
        if piece[0] == "{":
            out.append(piece)
        elif len(piece) < 2:
            return s
        elif piece[1] == "{":
            out.append("{" + piece[0] + "}" + piece[1:])
        else:
            out.append("{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """`a/b` -> `\\frac{a}{b}` when a and b are integer literals that print back as written."""
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    try:
        num, den = int(pieces[0]), int(pieces[1])
    except ValueError:
        return s
    return f"\\frac{{{num}}}{{{den}}}" if s == f"{num}/{den}" else s


def sympy_normalize(expr: str) -> str:
    """Plain-text form used by the sympy grader (miles `_normalize`)."""
    match = _WHOLE_TEXT_RE.search(expr)
    if match is not None:
        expr = match.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit_re in _UNIT_RES:
        expr = unit_re.sub("", expr)
    expr = _CIRC_RE.sub("", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = _THIN_COMMA_RE.sub("", expr)
    rounded = _float_integer(expr)
    if rounded is not None:
        expr = rounded
    if "\\" in expr:
        expr = latex_to_plain(expr)
    expr = _MINUS_RE.sub("-", expr)
    expr = _MIXED_NUMBER_RE.sub(r"\1+\2", expr)
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if str_is_int(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _float_integer(expr: str) -> str | None:
    """`str(int(round(float(expr))))` when `expr` parses as a float within 1e-7 of an integer."""
    try:
        value = float(expr)
        if abs(value - round(value)) <= 1e-7:
            return str(round(value))
    except (ValueError, OverflowError):
        pass
    return None


def strip_formatted_commas(expr: str) -> str:
    """`1,000,000` -> `1000000`, leaving tuple commas (`1,2`) alone; repeated to a fixed point."""
    while True:
        stripped = _FORMATTED_COMMA_RE.sub(r"\1\2\3", expr)
        if stripped == expr:
            return expr
        expr = stripped


def str_is_int(expr: str) -> bool:
    """True for text whose float value (formatted commas removed) is within 1e-7 of an integer."""
    try:
        value = float(strip_formatted_commas(expr))
        return abs(value - round(value)) <= 1e-7
    except (ValueError, OverflowError):
        return False


def is_frac_shaped(expr: str) -> bool:
    """miles `_is_frac`: `-?digits, any one char?, /, digits (not zero), any one char?`."""
    return bool(_FRAC_SHAPE_RE.search(expr))


def split_tuple(expr: str) -> list[str]:
    """Elements of `(a,b)` / `[a,b)` / ... (ends in `()[]`, none inside); else a one-element list."""
    expr = strip_formatted_commas(expr)
    if not expr:
        return []
    inner = expr[1:-1]
    if len(expr) > 2 and expr[0] in _TUPLE_CHARS and expr[-1] in _TUPLE_CHARS and not any(c in inner for c in _TUPLE_CHARS):
        return [elem.strip() for elem in inner.split(",")]
    return [expr]


# LaTeX -> text, as pylatexenc's `latex_to_text` renders it in miles' `_parse_latex` (after which
# miles maps the symbols √ π ∞ ∪ · × to sqrt pi inf U * *).
_COMMAND_TEXT = {
    "pi": "pi", "infty": "inf", "cup": "U", "cdot": "*", "times": "*", "le": "≤", "leq": "≤",
    "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "pm": "±", "mp": "∓", "circ": "∘", "cap": "∩",
    "div": "÷", "emptyset": "∅", "varnothing": "∅", "dots": "…", "ldots": "…", "cdots": "⋯", "to": "→", "in": "∈",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ϵ", "theta": "θ",
    "lambda": "λ", "mu": "μ", "sigma": "σ", "phi": "ϕ", "omega": "ω", "Delta": "Δ", "Omega": "Ω",
    "sin": "sin", "cos": "cos", "tan": "tan", "log": "log", "ln": "ln", "exp": "exp",
    ",": " ", ";": " ", ":": " ", " ": " ", "quad": "", "qquad": "", "!": "",
    "{": "", "}": "", "%": "%", "$": "$", "&": "&", "#": "#", "_": "_",
}
_DROPPED_WITH_ARGUMENT = ("mbox",)


def latex_to_plain(s: str) -> str:
    """One left-to-right pass: `\\frac{a}{b}` -> ` a/b` (no parentheses), `\\sqrt[n]{x}` ->
    `sqrt(x)`, known symbols as in `_COMMAND_TEXT`, any other command dropped (its arguments kept)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            j = i + 1
            while j < n and s[j].isalpha():
                j += 1
            name = s[i + 1 : j] if j > i + 1 else s[i + 1 : i + 2]
            i = j if j > i + 1 else i + 2
            if name == "frac":
                num, i = _read_arg(s, i)
                den, i = _read_arg(s, i)
                out.append(f" {num}/{den}")  # miles writes " \\frac": `1\\frac{1}{2}` is a mixed number
            elif name == "sqrt":
                if i < n and s[i] == "[":
                    close = s.find("]", i)
                    i = close + 1 if close > 0 else i
                arg, i = _read_arg(s, i)
                out.append(f"sqrt({arg})")
            elif name in _DROPPED_WITH_ARGUMENT:
                _, i = _read_arg(s, i)
            else:
                out.append(_COMMAND_TEXT.get(name, ""))
        elif ch == "{":
            arg, i = _read_arg(s, i)
            out.append(arg)
        else:
            out.append(ch)
            i += 1
    return "".join(out).strip()


def _read_arg(s: str, i: int) -> tuple[str, int]:
    """Read one LaTeX argument at `i` (`{...}` or one character); return (plain text, next index)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return "", i
    if s[i] != "{":
        if s[i] == "\\":
            j = i + 1
            while j < len(s) and s[j].isalpha():
                j += 1
            j = max(j, i + 2)
            return latex_to_plain(s[i:j]), j
        return s[i], i + 1
    depth, j = 0, i
    while j < len(s):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return latex_to_plain(s[i + 1 : j]), j + 1
        j += 1
    return latex_to_plain(s[i + 1 :]), len(s)


def sympy_eval_allowed(expr: str) -> bool:
    """miles `should_allow_eval` on `(gold)-(given)`: at most 2 distinct letters once `sqrt` and
    `frac` are removed, and no `^{`, `^(`, `^N^` or multi-digit exponent."""
    letters = {ch for ch in expr.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    if len(letters) > 2 or "^{" in expr or "^(" in expr:
        return False
    return re.search(r"\^[0-9]+\^|\^[0-9][0-9]+", expr) is None
