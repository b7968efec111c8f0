"""The GPU smoke run: `configs/kimi-k25-2layer-smoke.yaml` (miles' 2-layer K2.5 CI shape) on 1 x 4 H200.

A stub until a GPU node with the miles container runs it: marked `gpu` and `cluster`, so it is
collected everywhere and skipped (with the reason) unless CUDA is available and
`KIMI_GRPO_CLUSTER_TESTS=1`. What it would check is written out below; the body is not run yet.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "kimi-k25-2layer-smoke.yaml"


@pytest.mark.gpu
@pytest.mark.cluster
@pytest.mark.miles
def test_the_2layer_smoke_recipe_trains_on_4_h200() -> None:
    """`kimi-grpo run configs/kimi-k25-2layer-smoke.yaml` with the checkpoints under cluster.base_dir:
    2 rollouts, a save and an eval after each, `rollout/raw_reward` and `train/grad_norm` at every
    step in MLflow (logged by miles, read back by the flow), the MLflow run FINISHED."""
    pytest.skip("not written yet: needs a 1 x 4 H200 node with the miles container and the 2-layer checkpoints "
                "(CharyZeng/Kimi-K2.5-2layer and its BF16 copy) under cluster.base_dir")
