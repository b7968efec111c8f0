"""The one place where megatron-core's CUDA assumptions are redirected on a CPU-only machine.

megatron-core's `dist_checkpointing` calls `torch.cuda.synchronize()` and
`torch.cuda.current_device()` while saving and loading, which raise without a CUDA build.
`megatron_on_cpu()` replaces exactly those two calls for the duration of a `with` block, and only
when CUDA is unavailable; on a GPU machine it changes nothing. (Megatron's CUDA RNG helpers are
not touched: checkpoint conversion saves no RNG state.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Within the block, `torch.cuda.synchronize` is a no-op and `current_device()` is "cpu"."""
    if torch.cuda.is_available():
        yield
        return
    saved = (torch.cuda.synchronize, torch.cuda.current_device)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # "cpu" is not the declared `() -> int` on purpose: megatron only uses the result as a device
    setattr(torch.cuda, "current_device", lambda: "cpu")  # noqa: B010 - plain assignment would not type-check
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved
