"""Child process for the sympy step of miles' `grade_answer_sympy` (run as a script, not imported).

Protocol on stdin/stdout, one JSON line per request: `[gold, given]` -> `1` or `0`, where both are
plain-text elements from `normalize.sympy_normalize`. The answer is `1` iff sympy parses
`(gold)-(given)` (`^` read as `**`, standard transformations plus implicit multiplication and
application) and `simplify` gives 0, as miles' `are_equal_under_sympy` does; any error is `0`.
It prints `ready` once sympy is imported and warmed up. The parent enforces the time limit by
killing this process.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    # Keep the protocol channel private: anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import sympy  # noqa: PLC0415 - after stdout is redirected: sympy's import must not write to the protocol pipe
    from sympy.parsing import sympy_parser  # noqa: PLC0415

    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)

    def equal(gold: str, given: str) -> bool:
        difference = sympy_parser.parse_expr(f"({gold})-({given})".replace("^", "**"), transformations=transformations)
        return bool(sympy.simplify(difference) == 0)

    equal("sqrt(2)/2", "1/sqrt(2)")  # warm sympy's lazy paths so the first real check is not the slow one
    equal("x^2+2x+1", "(x+1)^2")
    channel.write("ready\n")
    for line in sys.stdin:
        try:
            gold, given = json.loads(line)
            ok = equal(gold, given)
        except Exception:  # an unparsable answer is a wrong answer
            ok = False
        channel.write("1\n" if ok else "0\n")


if __name__ == "__main__":
    main()
