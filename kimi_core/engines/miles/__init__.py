"""The production engine: drives the `miles` framework one rollout at a time (docs/design.md §5).

Importing this package imports neither miles nor Ray, SGLang or Megatron: `api.load_miles_api()`
imports them when an engine starts, in the engine's own process (the miles container).
"""

from __future__ import annotations

#: The miles commit this adapter mirrors (`radixark/miles`; it includes the bridge-mode resume fix
#: `49cac7b52`). Comments citing "train.py @31f1ca961" refer to this commit.
MILES_COMMIT = "31f1ca961a94cb860cec3b2dea34ec332bfa8f76"
