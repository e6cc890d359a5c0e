# Moonlight's Muon (arXiv 2502.16982) in Megatron's own --muon-* flags, sourced by the
# launchers so both implementations (--muon-impl) run the same method: Nesterov momentum
# 0.95, its quintic coefficients ("simple"), 5 steps, update scaled by 0.2 * sqrt(max(A, B)),
# each TP-split matrix orthogonalised whole; AdamW (0.9, 0.95) for embeddings, output layer
# and 1-D params.
MOONLIGHT=(
  --muon-momentum 0.95 --muon-nesterov --muon-coefficient-type simple --muon-num-ns-steps 5
  --muon-scale-mode spectral --muon-extra-scale-factor 0.2 --muon-tp-mode duplicated
  --adam-beta1 0.9 --adam-beta2 0.95
)
