"""Prompt data: sources through fsspec, row validation, the prepare_data stage, synthetic arithmetic."""

from kimi_core.data.prep import PREP_VERSION, PrepResult, find_prepared, prepare_dataset, read_prepared
from kimi_core.data.rows import DataValidationError, as_messages
from kimi_core.data.synthetic import synthetic_rows, worked_solution

__all__ = [
    "PREP_VERSION",
    "DataValidationError",
    "PrepResult",
    "as_messages",
    "find_prepared",
    "prepare_dataset",
    "read_prepared",
    "synthetic_rows",
    "worked_solution",
]
