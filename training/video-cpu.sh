#!/usr/bin/env bash
# The CPU route to the offline video model: `namm-transfer video train --preset cpu` (32 of each video's 64
# frames, 16 tokens per frame, a 2-layer ViT; 750 steps of 4 questions, about 30 s a step on one core here).
# Hours of training, so it runs in pieces: each call trains for TIME_BUDGET seconds (default 3600), checkpoints
# and writes the model so far; the next call resumes from the newest checkpoint in the same run folder.
# Extra arguments go to `namm-transfer video train` (e.g. --ship smollm2-135m-video once the 750 steps are done).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m namm_transfer.cli --log-level INFO video train --preset cpu \
  --output "${RUN_DIR:-runs/video/cpu}" --no-progress --time-budget "${TIME_BUDGET:-3600}" "$@"
