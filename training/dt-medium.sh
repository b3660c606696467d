#!/usr/bin/env bash
# The shipped Decision Transformers: collect the medium dataset (PPO behaviour policy), train the canonical DT,
# ship it into namm_transfer/weights/dt/{env}-medium. Resumable: rerun the same line after a kill.
# Usage: training/dt-medium.sh ENV [STEPS]   (ENV: hopper | halfcheetah | walker2d)
set -euo pipefail
command -v namm-transfer >/dev/null || export PATH="${VENV:-.venv}/bin:$PATH"   # the venv holding namm-transfer
env_name=${1:?usage: $0 ENV [STEPS]}
steps=${2:-6000}
namm-transfer rl collect --env "$env_name" --level medium --max-steps 1000000 --threads 1
namm-transfer rl train --env "$env_name" --level medium --steps "$steps" --eval-every 0 \
  --eval-episodes 10 --threads 1 --no-progress --output "runs/dt/$env_name-medium" --ship
