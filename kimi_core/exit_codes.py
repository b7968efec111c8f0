"""Process exit statuses shared by the CLI, the fallback driver and the rendered sbatch scripts.

One definition, so the pipeline sbatch script (`slurm.render.render_pipeline_sbatch`) and the
driver it runs (`kimi_core.runtime.fallback`) cannot disagree about what "requeue me" is.
"""

from __future__ import annotations

OK = 0
"""Success (or nothing left to do)."""
RUN_FAILED = 1
"""The run (or a submission) failed; the CLI printed why."""
INVALID_INPUT = 2
"""The recipe, its overrides or the command's arguments are invalid; nothing ran."""
REQUEUE_EXIT = 3
"""The driver saved a checkpoint after SIGUSR1/SIGTERM and asks the batch script to requeue the job."""
EXIT_SIGINT = 130
"""Stopped by SIGINT (Ctrl-C) after cleaning up (the shell's 128 + signal number)."""
EXIT_SIGTERM = 143
"""Stopped by SIGTERM after cleaning up (the shell's 128 + signal number)."""
