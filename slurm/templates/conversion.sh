# Multi-node torchrun, rendered by slurm.render_conversion_job (do not edit by hand).
# One srun task per node runs torchrun; the first node of the allocation hosts the rendezvous.
set -euo pipefail

{{extra_env}}PYTHON={{python}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT={{master_port}}
export MASTER_ADDR MASTER_PORT
echo "[convert] job $SLURM_JOB_ID: $SLURM_NNODES nodes x {{nproc_per_node}} processes, rendezvous $MASTER_ADDR:$MASTER_PORT"

srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1{{container_args}} \
    bash -c 'exec "$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node={{nproc_per_node}} --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "$@"' \
    "$PYTHON" {{command_args}}
