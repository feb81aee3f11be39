#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md (run it on a lent GPU; rows go to outputs/bench/bench.csv).
#  1. vtrain's fast settings (bf16 autocast, channels_last for CNNs, torch.compile) against timm's model
#     under timm's default settings (fp32, contiguous, eager; fused attention off in timm's Swin):
#     the "training images/s >= 1.3x timm" goal, and ViT-B/16's training MFU (goal >= 40%).
#  2. The same with identical settings on both sides: what the model code itself costs or gains.
#  3. LR-Net-50 against ResNet-50 (goal: at least half its training images/s), eager and compiled,
#     and the local relation layer, fast against reference.
set -euo pipefail
PY=${PY:-.venv/bin/python}
BATCH=${BATCH:-128}
TIMING=(bench.device=cuda bench.warmup=5 bench.iters=10 bench.repeats=5)
FAST=(bench.batch_size=$BATCH bench.precision=bf16 bench.channels_last=auto "${TIMING[@]}")

$PY -m vtrain.tools.bench -m backbone=swin_t,resnet50,vit_b16 --vs timm bench.reference_settings=timm_defaults \
  bench.compile=true "${FAST[@]}" "$@"
$PY -m vtrain.tools.bench -m backbone=swin_t,resnet50,vit_b16 --vs timm bench.reference_settings=same \
  bench.compile=true "${FAST[@]}" "$@"
$PY -m vtrain.tools.bench -m backbone=lrnet50 --vs resnet50 bench.compile=false,true "${FAST[@]}" "$@"
LAYER='{_target_:vtrain.layers.local_relation.LocalRelation2d,channels:64,kernel_size:7,implementation:%s}'
$PY -m vtrain.tools.bench "bench.module=$(printf "$LAYER" fast)" "bench.reference=$(printf "$LAYER" reference)" \
  'bench.input_shape=[64,56,56]' bench.modes=[train] bench.batch_size=32 "${TIMING[@]}" "$@"
