#!/usr/bin/env bash
# A one-machine "cluster" for trying job submission: a Ray head and an MLflow server, both bound
# to 127.0.0.1 (set HOST=0.0.0.0 to expose them on purpose). Stop with: ray stop; kill %mlflow pid
set -euo pipefail
HOST=${HOST:-127.0.0.1}
OUT=${OUT:-$PWD/outputs}
mkdir -p "$OUT/mlflow"
ray start --head --node-ip-address="$HOST" --dashboard-host="$HOST" --dashboard-port=8265
nohup mlflow server --host "$HOST" --port 5000 \
  --backend-store-uri "sqlite:///$OUT/mlflow/mlflow.db" \
  --artifacts-destination "$OUT/mlflow/artifacts" > "$OUT/mlflow/server.log" 2>&1 &
echo "mlflow server pid $! (log $OUT/mlflow/server.log)"
echo "submit: ray job submit --address http://$HOST:8265 --working-dir . -- \\"
echo "  python -m jobs.pretrain --config jobs/configs/digits.yaml run.tracking_uri=http://$HOST:5000 run.output_root=$OUT"
