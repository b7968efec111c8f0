"""The pipeline's stages as plain functions, shared by the Prefect flow and the sbatch fallback."""
