#!/usr/bin/env bash
# Reproduces README "CIFAR-10 results" with the job commands alone: one context encoder per mask
# type pretrained on ../shared/datasets/cifar10 train shards (Ray Train, 2 CPU workers, a fixed
# step budget), then one probe run over all of them plus the random-init and raw-pixel baselines
# on the test shards. Everything lands under $OUT and in its MLflow store.
#
#   bash benchmarks/cifar10_results.sh            # STEPS=1500 per encoder by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/cifar10}
STEPS=${STEPS:-1500}
RUN_TAG=${RUN_TAG:-$(date +%Y%m%d-%H%M%S)}  # rerun with the same tag to resume
DATA=${CE_CIFAR10_DIR:-../shared/datasets/cifar10}
encoders=()
for mask in center random_block random_region; do
  full=$([ "$mask" = center ] && echo false || echo true)
  start=$(date +%s)
  log=$(python -m jobs.pretrain --config jobs/configs/cifar10.yaml \
    data.train_shards="$DATA/cifar10-train-{000000..000009}.tar" \
    data.val_shards="$DATA/cifar10-test-{000000..000001}.tar" \
    mask.kind=$mask model.full_image_output=$full train.max_steps=$STEPS \
    train.checkpoint_every=500 train.sample_every=500 \
    run.output_root="$OUT" run.run_name="cifar10-$mask-$RUN_TAG" | tee -a /dev/stderr)  # -a: never truncate a log stderr points to
  echo "[cifar10] $mask: $(( $(date +%s) - start )) s for $STEPS steps" >&2
  encoders+=(--encoder "$mask=$(sed -n 's/^\[pretrain\] encoder: //p' <<< "$log")")
done
python -m jobs.probe "${encoders[@]}" \
  --train-shards "$DATA/cifar10-train-{000000..000009}.tar" \
  --test-shards "$DATA/cifar10-test-{000000..000001}.tar" \
  --image-size 32 --output-root "$OUT" --tracking-uri "sqlite:///$(realpath "$OUT")/mlflow.db" \
  --experiment cifar10-probe
