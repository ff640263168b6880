#!/usr/bin/env bash
# The CIFAR-10 suite of README's "CIFAR-10 results", end to end, with the job commands alone:
#
#   1. pretraining (ce-pretrain, 2 Ray Train CPU workers): dcgan_region_rec (random regions,
#      reconstruction only, 6,000 steps) and dcgan_block_joint (random blocks, joint loss, 3,000
#      steps), seeds 0-2 and $BJ_SEEDS (README: 0) respectively; URIs go to $OUT/encoders.txt;
#   2. ce-finetune, region_rec seed s vs random init seed s: 10 % labels for each of $FT_SEEDS,
#      and the 45,000 labels outside the val carve (8 epochs) for seed 0;
#   3. ce-benchmark: `gap` at 1 / 10 / 100 %, `spatial` at 1 / 10 % (its full-label 9,216-d fits
#      are hours of CPU here), layers conv1 / conv2 / bottleneck, in two parts side by side (one
#      BLAS thread each), then once for the tables, MLflow and benchmarks/results;
#   4. README's tables from benchmarks/results (python -m evaluation.bench_readme).
#
# Every stage resumes: an encoder already in encoders.txt is not trained again, a fine-tune
# with a result row is skipped, done probe units are read back. On the 2-core machine of the
# README it was ~4.5 h of wall in all (pretraining 2.2 h of it).
#
#   bash benchmarks/cifar10_suite.sh                      # everything
#   OUT=/data/cifar10 FT_SEEDS="0 1 2" bash benchmarks/cifar10_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/cifar10}
DATA=${CE_CIFAR10_DIR:-../shared/datasets/cifar10}
FT_SEEDS=${FT_SEEDS:-0 1}
BJ_SEEDS=${BJ_SEEDS:-0}  # 0 1 2 makes dcgan_block_joint a headline candidate (--headline-min-seeds)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd) DATA=$(cd "$DATA" && pwd)
URI=sqlite:///$OUT/mlflow.db

pretrain() {  # name seed steps overrides...
  local name=$1 seed=$2 steps=$3 start rn uri
  shift 3
  grep -q "^$name $seed " "$OUT/encoders.txt" 2>/dev/null && return 0
  rn=cifar10-$name-s$seed start=$(date +%s)
  python -m jobs.pretrain --config jobs/configs/cifar10.yaml \
    data.train_shards="$DATA/cifar10-train-{000000..000008}.tar" \
    data.val_shards="$DATA/cifar10-train-000009.tar" \
    train.max_steps="$steps" train.checkpoint_every=500 train.sample_every=1000 \
    train.seed="$seed" "$@" run.output_root="$OUT" run.run_name="$rn" > "$OUT/$rn.log" 2>&1
  uri=$(sed -n 's/^\[pretrain\] encoder: //p' "$OUT/$rn.log" | tail -1)
  echo "$name $seed $uri $(($(date +%s) - start))" >> "$OUT/encoders.txt"
}
for seed in 0 1 2; do
  pretrain dcgan_region_rec "$seed" 6000 mask.kind=random_region model.full_image_output=true \
    loss.lambda_adv=0
done
for seed in $BJ_SEEDS; do
  pretrain dcgan_block_joint "$seed" 3000 mask.kind=random_block model.full_image_output=true
done

finetune() {  # tag seed overrides...: region_rec seed s and random init seed s
  local tag=$1 seed=$2 ce enc rn
  shift 2
  ce=$(awk -v s="$seed" '$1 == "dcgan_region_rec" && $2 == s {print $3}' "$OUT/encoders.txt")
  for enc in "dcgan_region_rec=$ce" random_init=random; do
    rn=$tag-${enc%%=*}-s$seed
    [ -f "$OUT/finetune/$rn/result.csv" ] && continue
    python -m jobs.finetune --config finetune_cifar10 --encoder "$enc" seed="$seed" \
      data.train_shards="$DATA/cifar10-train-{000000..000009}.tar" \
      data.test_shards="$DATA/cifar10-test-{000000..000001}.tar" "$@" \
      run.output_root="$OUT" run.tracking_uri="$URI" run.run_name="$rn" > "$OUT/$rn.log" 2>&1
  done
}
for seed in $FT_SEEDS; do finetune ft10 "$seed"; done
# All 45,000 labels outside the val carve, 8 epochs (docs/finetune.md's budget): seed 0.
finetune ft90 0 data.label_fraction=0.9 optim.epochs=8
python - "$OUT" <<'PY'
import glob, sys
import pandas as pd
rows = [pd.read_csv(f) for f in sorted(glob.glob(f"{sys.argv[1]}/finetune/ft*-*/result.csv"))]
if rows:
    pd.concat(rows).to_csv(f"{sys.argv[1]}/finetune_results.csv", index=False)
PY

ENC=()
while read -r name seed uri _; do ENC+=(--encoder "$name=$uri,seed=$seed"); done < "$OUT/encoders.txt"
FLAGS=("${ENC[@]}"
  --train-shards "$DATA/cifar10-train-{000000..000009}.tar"
  --test-shards "$DATA/cifar10-test-{000000..000001}.tar"
  --output-root "$OUT" --tracking-uri "$URI" --blas-threads 1
  --protocols gap,spatial --fractions 0.01,0.1,1 --protocol-fractions spatial=0.01,0.1
  --layers conv1,conv2,bottleneck)
for i in 0 1; do
  OMP_NUM_THREADS=1 python -m jobs.benchmark "${FLAGS[@]}" --part "$i/2" \
    > "$OUT/benchmark-part$i.log" 2>&1 &
done
wait
FT=()
[ -f "$OUT/finetune_results.csv" ] && FT=(--finetune-results "$OUT/finetune_results.csv")
python -m jobs.benchmark "${FLAGS[@]}" "${FT[@]}" --results-dir benchmarks/results \
  | tee "$OUT/benchmark-final.log"
python -m evaluation.bench_readme
