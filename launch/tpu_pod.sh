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
# Interpreter on each worker: PYTHON if set there, else its python3/python if it has vlp_jax,
# else $REPO_DIR/.venv/bin/python (made if missing); the TPU build of the installed jax version
# (libtpu) is added to that environment.
# Each worker runs vlp_jax.main under vlp_jax.runtime.supervise (same flags): when worker 0 dies,
# JAX aborts the others and the supervisor reports "process 0 … is gone" with exit 8.
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
  VLP_MAKE_VENV=1 . launch/find_python.sh
  jax_version=\$(\"\$PY\" -c 'import jax; print(jax.__version__)')
  \"\$PY\" -m pip install -q \"jax[tpu]==\$jax_version\" >/dev/null
  \"\$PY\" -m vlp_jax.runtime.supervise $args
"
