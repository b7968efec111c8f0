"""The temporary Prefect API server of a `kimi-grpo run` that has no Prefect server to talk to.

Without an API URL (environment or Prefect profile), Prefect starts a temporary server itself at
the flow's first API call (`prefect.server.api.server.SubprocessASGIServer`): it imports the whole
server package into the CLI process (about 2.5 s on a 2-core machine), then waits for the server
subprocess to boot (about 4 s), all on the start-up's critical path. `kimi-grpo run` starts the
same server process as soon as the recipe is valid instead, so that its boot overlaps the CLI's own
imports and checks, and hands its URL to the flow (`api()`); the CLI process never imports the
server package. The server is stopped when the CLI exits, whatever the outcome.

The server command and its environment are Prefect's own for its temporary server (Prefect 3.8,
`SubprocessASGIServer._run_uvicorn_command`): uvicorn on `create_app` with the UI off and the
server in ephemeral mode (the background services a flow run needs, nothing else).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from kimi_core.runtime.ray_local import free_port

#: How Prefect runs its temporary server (see the module docstring).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
START_ATTEMPTS = 3  # a port taken between picking it and the server binding it: try another
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MIN_STARTUP_TIMEOUT_S = 60  # Prefect's default (20 s) is tight while the CLI imports beside it on 2 cores


class ServerDidNotStart(RuntimeError):
    """The temporary Prefect server exited or did not answer in time."""


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux `PR_SET_PDEATHSIG`); elsewhere nothing."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TemporaryPrefectServer:
    """One `uvicorn` process serving Prefect's API on a loopback port (see the module docstring)."""

    def __init__(self, *, env: dict[str, str], startup_timeout_s: float) -> None:
        self._env = env
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self._proc = self._spawn()
        self._ready = False

    @classmethod
    def start_if_needed(cls) -> TemporaryPrefectServer | None:
        """Start one when Prefect would (no API URL, ephemeral mode allowed); else None.

        Started before Prefect's settings are read (importing them takes about a second), unless the
        environment names a server: a Prefect profile that names one, or forbids a temporary
        server, stops it again at once. The server process reads the same environment and profile."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        server = cls(env={**os.environ, **SERVER_ENV}, startup_timeout_s=MIN_STARTUP_TIMEOUT_S)
        from prefect.settings import get_current_settings  # noqa: PLC0415 - Prefect only for `run`

        settings = get_current_settings()
        if settings.api.url or not settings.server.ephemeral.enabled:
            server.stop()
            return None
        server.startup_timeout_s = max(float(settings.server.ephemeral.startup_timeout_seconds), MIN_STARTUP_TIMEOUT_S)
        return server

    @property
    def url(self) -> str:
        """The API URL (what `PREFECT_API_URL` holds)."""
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        # Its own session: a Ctrl-C to the terminal's process group reaches the CLI, whose clean-up
        # still reports to this server (Prefect's own server, in the CLI's group, died with the
        # Ctrl-C and the clean-up failed). The CLI stops it; if the CLI is killed, Linux's
        # parent-death signal ends it.
        return subprocess.Popen(command, env=self._env, start_new_session=True, preexec_fn=_end_with_parent)

    def wait_ready(self) -> None:
        """Block until the API answers its health check; a server that exited early (its port was
        taken meanwhile) is started again on another port, up to `START_ATTEMPTS` times."""
        if self._ready:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        attempt = 1
        while True:
            code = self._proc.poll()
            if code is not None:
                if attempt == START_ATTEMPTS:
                    raise ServerDidNotStart(f"the temporary Prefect server exited with code {code} "
                                            f"({attempt} attempts); its messages are above")
                attempt += 1
                self.port = free_port()
                self._proc = self._spawn()
            elif self._healthy():
                self._ready = True
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerDidNotStart(f"the temporary Prefect server at {self.url} did not answer within "
                                        f"{self.startup_timeout_s:.0f} s; set PREFECT_API_URL to a running server")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    @contextlib.contextmanager
    def api(self) -> Iterator[str]:
        """Within the block, Prefect clients of this process use this server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: PLC0415 - Prefect only for `run`

        self.wait_ready()
        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            yield self.url

    def stop(self, timeout_s: float = 10) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout_s`); idempotent."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
