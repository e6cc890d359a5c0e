#!/usr/bin/env bash
# GPT pretraining through Megatron's pretrain() on one node of GPUs (NCCL, bf16),
# --optimizer muon with Moonlight's settings.
#
#   launch/megatron/train_gpu.sh                      # 8 GPUs, TP=2 x DP=4, dense ~0.5B
#   MOE=1 TP=1 EP=8 launch/megatron/train_gpu.sh      # 8-expert MoE, experts over EP=8
#   IMPL=megatron launch/megatron/train_gpu.sh        # Megatron's own Muon, for comparison
#
# Extra arguments go to pretrain_gpt.py (later flags win). The data is the embedded stdlib
# byte corpus (a few MB): enough to exercise the optimizer, not a pretraining corpus.
# Not run by this project (it has no GPU); the CPU launcher runs the same entry.
set -euo pipefail
cd "$(dirname "$0")/../.."

GPUS=${GPUS:-8}
TP=${TP:-2}
EP=${EP:-1}
MOE=${MOE:-0}
STEPS=${STEPS:-5000}
IMPL=${IMPL:-muon_ds}
PYTHON=${PYTHON:-.venv/bin/python}

MODEL=(
  --num-layers 24 --hidden-size 1536 --ffn-hidden-size 4096
  --num-attention-heads 16 --group-query-attention --num-query-groups 4
  --swiglu --normalization RMSNorm --disable-bias-linear --position-embedding-type rope
  --untie-embeddings-and-output-weights --seq-length 2048 --max-position-embeddings 2048
)
if [[ "$MOE" == 1 ]]; then
  MODEL+=(
    --num-experts 8 --moe-ffn-hidden-size 1024 --moe-router-topk 2 --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 1e-2
  )
fi
TRAINING=(
  --distributed-backend nccl --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP"
  --sequence-parallel --micro-batch-size 4 --global-batch-size 256 --train-iters "$STEPS"
  --bf16 --hidden-dropout 0 --attention-dropout 0 --clip-grad 1.0 --seed 1234
  --eval-interval 500 --eval-iters 10 --log-interval 10
)
OPTIMIZER=(
  --optimizer muon --use-distributed-optimizer --muon-impl "$IMPL"
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 200 --weight-decay 0.1
)
source launch/megatron/moonlight_flags.sh  # MOONLIGHT=(...)

# Megatron asks for one CUDA connection queue with TP on pre-Blackwell GPUs.
CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} \
  "$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS" --master-port "${MASTER_PORT:-29500}" \
  -m launch.megatron.pretrain_gpt "${MODEL[@]}" "${TRAINING[@]}" "${OPTIMIZER[@]}" \
  "${MOONLIGHT[@]}" "$@"
