#!/bin/bash
# Continued pretraining on 2 nodes x 8 GPUs with DeepSpeed ZeRO-3 (configs/accelerate/zero3_2nodes.yaml):
#
#   sbatch launch/slurm.sh configs/27b_zero3.yaml --set train.grad_accum=1 --resume auto
#
# Everything after the run config goes to launch/train.py. One task per node: it starts
# `accelerate launch`, which starts torchrun and that node's 8 ranks. Submit from the repository, with
# the venv active (sbatch passes the environment on), on storage every node mounts at the same path:
# the repository, data.shards, the model and tokenizer files and output.dir must be the same files on
# every node (korcpt refuses, at the start and in one line, an output.dir the nodes do not share).
# Variables: NODES/GPUS_PER_NODE follow the allocation; MASTER_PORT (default: from the job id, so two
# jobs on one node do not collide) and ACCELERATE_CONFIG may be set before sbatch.
#SBATCH --job-name=korcpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm.sh RUN_CONFIG [launch/train.py options]}
shift
cd "${SLURM_SUBMIT_DIR:-.}"

NODES=${SLURM_NNODES:?not inside a SLURM allocation}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# The rendezvous host is the allocation's first node; its rank-0 agent listens on MASTER_PORT. (Not
# `| head -n 1`: under pipefail, scontrol killed by SIGPIPE when head exits fails the job, exit 141.)
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/zero3_2nodes.yaml}
export MASTER_ADDR MASTER_PORT NODES GPUS_PER_NODE ACCELERATE_CONFIG
echo "korcpt: $NODES nodes x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT, $ACCELERATE_CONFIG" >&2

# Single quotes: SLURM_NODEID is each task's own node index (0 on MASTER_ADDR), read where the task runs.
# --kill-on-bad-exit: a node that fails (or refuses output.dir) ends the others instead of leaving them
# waiting at a barrier.
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NODES" --num_processes "$((NODES * GPUS_PER_NODE))" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    launch/train.py --config "$0" "$@"' "$CONFIG" "$@"
