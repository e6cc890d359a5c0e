#!/usr/bin/env bash
# GPT pretraining through Megatron's pretrain() on CPU ranks (gloo), --optimizer muon.
#
#   launch/megatron/train_cpu.sh                    # 4 ranks, TP=2 x DP=2, dense, muon_ds
#   MOE=1 TP=1 EP=2 launch/megatron/train_cpu.sh    # 6-expert MoE, EP=2 (expert-DP=2)
#   IMPL=megatron launch/megatron/train_cpu.sh      # Megatron's own Muon, for comparison
#
# Extra arguments go to pretrain_gpt.py (later flags win), e.g. --train-iters 100.
# Checkpoints are Megatron's own: --save DIR --save-interval N (--exit-interval N to stop
# there), then the same command with --load DIR resumes, also at another DP size (RANKS).
# --dist-ckpt-optim-fully-reshardable (loadable at another TP size too) needs
# --distrib-optim-fully-reshardable-mem-efficient on CPU: the other mode gathers over NCCL.
# A tiny model on the embedded stdlib byte corpus. Moonlight's Muon settings are spelled
# out with Megatron's own --muon-* flags, so both implementations run the same method.
set -euo pipefail
cd "$(dirname "$0")/../.."

RANKS=${RANKS:-4}
TP=${TP:-2}
EP=${EP:-1}
MOE=${MOE:-0}
STEPS=${STEPS:-30}
IMPL=${IMPL:-muon_ds}
PYTHON=${PYTHON:-.venv/bin/python}

MODEL=(
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 128
  --num-attention-heads 4 --group-query-attention --num-query-groups 2
  --swiglu --normalization RMSNorm --disable-bias-linear --position-embedding-type rope
  --seq-length 64 --max-position-embeddings 64
)
if [[ "$MOE" == 1 ]]; then
  MODEL+=(
    --num-experts 6 --moe-ffn-hidden-size 48 --moe-router-topk 2
    --moe-token-dispatcher-type allgather  # the alltoall dispatcher needs CUDA streams
  )
fi
# Megatron's fused kernels are CUDA (or Transformer Engine) kernels.
CPU=(
  --cpu --distributed-backend gloo --transformer-impl local --use-cpu-initialization
  --no-rope-fusion --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion
  --no-gradient-accumulation-fusion --no-persist-layer-norm
)
TRAINING=(
  --tensor-model-parallel-size "$TP" --expert-model-parallel-size "$EP"
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$STEPS"
  --bf16 --hidden-dropout 0 --attention-dropout 0 --clip-grad 1.0 --seed 1234
  --eval-interval "$STEPS" --eval-iters 2 --log-interval 1
)
OPTIMIZER=(
  --optimizer muon --use-distributed-optimizer --muon-impl "$IMPL"
  --lr 2e-2 --min-lr 2e-3 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.1
)
source launch/megatron/moonlight_flags.sh  # MOONLIGHT=(...)

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES="" \
  "$PYTHON" -m torch.distributed.run --nproc-per-node "$RANKS" --master-port "${MASTER_PORT:-29500}" \
  -m launch.megatron.pretrain_gpt "${MODEL[@]}" "${CPU[@]}" "${TRAINING[@]}" "${OPTIMIZER[@]}" \
  "${MOONLIGHT[@]}" "$@"
