#!/usr/bin/env bash
# Long-context Decision Transformers (issue #24): trained on long segments, half of them episode prefixes, so that
# the cached rollout's long history (the eval's memory policies) is in their training distribution. Collects the
# medium dataset if absent (as training/dt-medium.sh), derives the positions-only one for ENV=*-po, trains, and
# ships the model as {ENV}-medium-long (eval: --model shipped:{ENV}-medium-long). Resumable: rerun the same line.
# Usage: training/dt-long.sh ENV [cpu|device] [STEPS]
#   ENV: hopper | halfcheetah | walker2d | hopper-po | halfcheetah-po | walker2d-po
#   cpu:    K = 200 steps (600 tokens), batch 16, one thread, 4000 steps
#   device: K = 1000 steps (whole episodes, up to 3000 tokens), batch 64, cuda, bfloat16 autocast, 20000 steps
set -euo pipefail
command -v namm-transfer >/dev/null || export PATH="${VENV:-.venv}/bin:$PATH"   # the venv holding namm-transfer
env_name=${1:?usage: $0 ENV [cpu|device] [STEPS]}
preset=${2:-cpu}
case $preset in
  cpu) opts=(--context 200 --batch-size 16 --device cpu --threads 1); steps=${3:-4000} ;;
  device) opts=(--context 1000 --batch-size 64 --device cuda --dtype bfloat16 --threads 4); steps=${3:-20000} ;;
  *) echo "unknown preset $preset (cpu or device)" >&2; exit 2 ;;
esac
base=${env_name%-po}
namm-transfer rl collect --env "$base" --level medium --max-steps 1000000 --threads 1
if [[ $env_name == *-po ]]; then
  namm-transfer rl derive-po --env "$base" --level medium
fi
namm-transfer rl train --env "$env_name" --level medium --steps "$steps" "${opts[@]}" --prefix-fraction 0.5 \
  --eval-every 0 --eval-episodes 10 --no-progress --output "runs/dt/$env_name-medium-long-$preset" \
  --ship --ship-name "$env_name-medium-long"
