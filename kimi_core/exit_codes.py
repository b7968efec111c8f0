"""Exit statuses of the command line and of the sbatch fallback's driver (docs/design.md §11)."""

RUN_FAILED = 1
"""A failure at run time; the message names the stage and the reason."""
INVALID_INPUT = 2
"""Invalid input (recipe, override, profile) or a recipe this install cannot run; nothing was submitted."""
REQUEUE_EXIT = 3
"""The fallback driver saved on a stop request (deadline, preemption): its batch script requeues the job."""
