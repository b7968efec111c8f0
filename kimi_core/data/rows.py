"""Row format of prompt data sets (the miles `--input-key/--label-key` convention) and its checks.

A row is a JSON object. The prompt under `input_key` is either a string (one user message once the
chat template is applied) or a non-empty list of chat messages `{"role": str, "content": str}`.
The label under `label_key` is a string: miles compares labels as strings, so a number in the
source is rejected rather than silently converted. The optional metadata under `metadata_key` is
an object (absent or null means none).

JSON is read and written with `orjson` when it is installed and with the standard library
otherwise; both write the same bytes for prompt rows (UTF-8, no spaces, keys in insertion order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

orjson: ModuleType | None  # None without orjson (tests set it to None for the standard-library path)
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is present in the project venv
    orjson = None
else:
    orjson = _orjson

Prompt = str | list[dict[str, Any]]


class DataValidationError(ValueError):
    """A bad row in a source data set; `location` is `source:line` (or `source:row N`)."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass(frozen=True)
class RowKeys:
    """Which keys of a source row hold the prompt, the label and the optional metadata."""

    input_key: str = "prompt"
    label_key: str = "label"
    metadata_key: str | None = None


def loads(data: bytes | str) -> Any:
    """Parse one JSON document; raises `ValueError` (a `json.JSONDecodeError`) when it is not JSON."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def dumps(obj: Any) -> bytes:
    """Serialize `obj` to compact UTF-8 JSON bytes (no trailing newline), deterministically."""
    if orjson is not None:
        encoded: bytes = orjson.dumps(obj)
        return encoded
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def prompt_key(prompt: Prompt) -> str | bytes:
    """Hashable identity of a prompt for exact-duplicate detection (string as is, list as JSON)."""
    return prompt if isinstance(prompt, str) else dumps(prompt)


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The chat-message list of a prompt: a string prompt becomes one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_prompt(prompt: Any, key: str) -> str | None:
    """Reason why `prompt` is not a valid prompt, or None when it is."""
    if isinstance(prompt, str):
        return None if prompt.strip() else f"empty prompt under key {key!r}"
    if not isinstance(prompt, list):
        return f"prompt under key {key!r} must be a string or a list of chat messages, got {_describe(prompt)}"
    if not prompt:
        return f"empty prompt under key {key!r} (no chat messages)"
    for index, message in enumerate(prompt):
        if not isinstance(message, dict):
            return f"prompt message {index} must be an object with 'role' and 'content', got {_describe(message)}"
        for field in ("role", "content"):
            if field not in message:
                return f"prompt message {index} has no {field!r} (keys: {sorted(message)})"
            if not isinstance(message[field], str):
                return f"prompt message {index} {field!r} must be a string, got {_describe(message[field])}"
        if not message["role"]:
            return f"prompt message {index} has an empty 'role'"
    if not any(message["content"].strip() for message in prompt):
        return f"empty prompt under key {key!r} (every message content is blank)"
    return None


def check_row(row: Any, keys: RowKeys) -> tuple[Prompt, str, dict[str, Any] | None] | str:
    """Validate one decoded source row.

    Returns `(prompt, label, metadata)` for a good row, or a string with the reason it is bad
    (the caller adds the location). Strings, not exceptions, keep the skip mode cheap.
    """
    if not isinstance(row, dict):
        return f"row must be a JSON object, got {_describe(row)}"
    if keys.input_key not in row:
        return f"missing key {keys.input_key!r} (keys: {sorted(row)})"
    if keys.label_key not in row:
        return f"missing key {keys.label_key!r} (keys: {sorted(row)})"
    prompt = row[keys.input_key]
    reason = _check_prompt(prompt, keys.input_key)
    if reason is not None:
        return reason
    label = row[keys.label_key]
    if not isinstance(label, str):
        return (
            f"label under key {keys.label_key!r} must be a string, got {_describe(label)} "
            "(labels are compared as strings; quote it in the source)"
        )
    metadata = None
    if keys.metadata_key is not None:
        metadata = row.get(keys.metadata_key)
        if metadata is not None and not isinstance(metadata, dict):
            return f"metadata under key {keys.metadata_key!r} must be an object, got {_describe(metadata)}"
    return prompt, label, metadata
