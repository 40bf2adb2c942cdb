#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker VM; jax.distributed
# auto-detects the TPU topology (no coordinator flags needed).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --config=configs/base.py \
#       --workdir=gs://my-bucket/runs/base --config.train.batch_size=4096
#
# Prerequisites: the repo is checked out at $REPO_DIR on every worker (or use --scp below), the
# workdir is on storage all workers share (a GCS bucket), and the built-in catalog/TFDS cache is
# either shared (--config.data.cache_dir=gs://...) or generated on process 0 beforehand.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-~/vlp_jax}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
args=$(printf ' %q' "$@")
# shellcheck disable=SC2086
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  set -e
  cd $REPO_DIR
  [ -x .venv/bin/python ] || make venv
  .venv/bin/pip install -q 'jax[tpu]' >/dev/null
  .venv/bin/python -m vlp_jax.main $args
"
