"""The symbolic grader fails loudly: a worker that cannot start raises; a crash is counted and retried."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from kimi_core.rewards import grader_restarts, grader_timeouts
from kimi_core.rewards.symbolic import GraderStartError, SymbolicChecker

pytestmark = pytest.mark.timeout(120)


def test_missing_executable_raises_naming_the_command() -> None:
    checker = SymbolicChecker(command=["/nonexistent/python3", "-u", "worker.py"])
    with pytest.raises(GraderStartError, match=r"/nonexistent/python3.*failed to start: FileNotFoundError"):
        checker.check("1", "1", timeout_s=1.0)
    checker.close()


def test_worker_that_exits_raises_with_its_stderr() -> None:
    checker = SymbolicChecker(command=[sys.executable, "-c", "import sys; sys.exit('no sympy here')"])
    with pytest.raises(GraderStartError, match=r"exit code 1; stderr: no sympy here"):
        checker.start()
    checker.close()


def test_worker_that_never_gets_ready_raises() -> None:
    checker = SymbolicChecker(command=[sys.executable, "-c", "import time; time.sleep(60)"], startup_timeout_s=0.5)
    with pytest.raises(GraderStartError, match=r"no 'ready' within 0.5s, so killed"):
        checker.start()
    checker.close()


def test_killed_worker_is_counted_and_grading_continues() -> None:
    checker = SymbolicChecker()
    try:
        checker.start()
        assert checker.check("sqrt(8)", "2sqrt(2)", timeout_s=10.0) is True
        pid = checker.worker_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert checker.check("sqrt(8)", "2sqrt(2)", timeout_s=10.0) is True
        assert checker.check("3", "1/2", timeout_s=10.0) is False
        assert (checker.restarts, checker.timeouts) == (1, 0)
        assert checker.worker_pid() != pid
    finally:
        checker.close()


def test_crash_during_a_check_is_retried_on_a_fresh_worker(tmp_path: Path) -> None:
    # The first worker dies on its first request; later workers answer "1".
    marker = tmp_path / "crashed"
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        print("ready", flush=True)
        for line in sys.stdin:
            if not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()
                os._exit(3)
            print("1", flush=True)
    """))
    checker = SymbolicChecker(command=[sys.executable, "-u", str(script)])
    try:
        assert checker.check("a", "b", timeout_s=10.0) is True
        assert (checker.restarts, checker.timeouts) == (1, 0)
        assert checker.check("a", "b", timeout_s=10.0) is True
        assert checker.restarts == 1
    finally:
        checker.close()


def test_process_wide_counters_are_ints() -> None:
    assert isinstance(grader_restarts(), int) and grader_restarts() >= 0
    assert isinstance(grader_timeouts(), int) and grader_timeouts() >= 0
