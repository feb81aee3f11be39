#!/usr/bin/env bash
# The CPU comparison recorded in docs/benchmarks.md: each backbone against timm's own model (and LR-Net-50
# against ResNet-50, the fast local relation layer against the reference one), interleaved in one process.
# Small batch, one iteration per timed block, many blocks: the median resists a shared machine's noise.
# Rows are appended to outputs/bench/bench.csv. Extra arguments go to every command (e.g. bench.threads=2).
set -euo pipefail
PY=${PY:-.venv/bin/python}
COMMON=(bench.batch_size=2 bench.warmup=1 bench.iters=1 bench.repeats=7 "$@")

$PY -m vtrain.tools.bench -m backbone=resnet50,swin_t,vit_s16 --vs timm "${COMMON[@]}"
$PY -m vtrain.tools.bench backbone=lrnet50 --vs resnet50 "${COMMON[@]}"
# Local relation layer, training at 56x56 with 64 channels (LR-Net-50's first stage width is 100;
# the goal is stated at 64): fast (strided views) vs reference (unfold).
LAYER='{_target_:vtrain.layers.local_relation.LocalRelation2d,channels:64,kernel_size:7,implementation:%s}'
$PY -m vtrain.tools.bench "bench.module=$(printf "$LAYER" fast)" "bench.reference=$(printf "$LAYER" reference)" \
  'bench.input_shape=[64,56,56]' bench.modes=[train] "${COMMON[@]}"
