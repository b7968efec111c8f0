"""Child process for symbolic answer checks with math-verify (run as a script, not imported).

Protocol on stdin/stdout, one JSON line per request: `[gold, given, seconds]` -> `1` or `0`.
It prints `ready` once math-verify is imported and warmed up. The parent enforces the time
limit by killing this process; math-verify's own alarm-based timeouts (this is the main
thread, so they work here) are a second line of defence for slow pure-Python steps.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _check(parse, verify, gold: str, given: str, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    limit = max(1, math.ceil(seconds))
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
    given_parsed = parse("\\boxed{" + given + "}", parsing_timeout=limit)
    if not gold_parsed or not given_parsed:
        return False
    return bool(verify(gold_parsed, given_parsed, timeout_seconds=limit))


def main() -> None:
    # Keep the protocol channel private: anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from math_verify import parse, verify

    # Warm sympy's lazy paths so the first real check is not the slow one.
    _check(parse, verify, "\\frac{1}{2}", "0.5", 5)
    _check(parse, verify, "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 5)
    _check(parse, verify, "x^2+2x+1", "(x+1)^2", 5)
    channel.write("ready\n")
    for line in sys.stdin:
        try:
            gold, given, seconds = json.loads(line)
            ok = _check(parse, verify, gold, given, seconds)
        except Exception:  # an unparsable answer is a wrong answer
            ok = False
        channel.write("1\n" if ok else "0\n")


if __name__ == "__main__":
    main()
