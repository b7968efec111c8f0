"""The runtime layer (docs/design.md §2): run state bookkeeping, the one rollout loop, the engine
session, Ray bring-up, MLflow tracking, failure classes and stage-job submission. It sits above the
domain (the rest of `kimi_core`) and below `tasks/` and `flows/`; it never imports Prefect or the
scheduler package `slurm/` (job submission receives its launcher)."""
