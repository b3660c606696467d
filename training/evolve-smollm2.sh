#!/usr/bin/env bash
# The run behind the shipped bam.smollm2-135m (CPU settings; resumable: rerun the same command). float32: on
# CPUs without native bfloat16 (this machine) bfloat16 matmuls run several times slower than float32.
# RUN_DIR picks the run folder (default training/evolve-smollm2); extra arguments are passed on
# (for example --generations 5 to stop early, or --ship bam.smollm2-135m once the run is done).
exec "${PYTHON:-python}" -m namm_transfer.cli --log-level INFO evolve --model smollm2-135m --dtype float32 \
  --run-dir "${RUN_DIR:-training/evolve-smollm2}" \
  --stages passkey,kv_retrieval:12 --stages passkey,kv_retrieval,multikey_needle:8 \
  --lengths 768,1024 --pool-size 8 --prompts-per-task 1 \
  --update-interval 256 --chunk-size 256 --cache-weight 1.0 --cache-target 0.5 \
  --warm-start --warm-start-prompts 3 --warm-start-steps 300 --warm-start-keep 0.8 --warm-start-calibrate "$@"
