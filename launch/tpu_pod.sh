#!/usr/bin/env bash
# PUMA training on a Cloud TPU pod slice: the same command on every worker VM at once.
#
#   TPU_NAME=puma-v4-256 ZONE=us-central2-b WORKDIR=/mnt/shared/pretrain \
#     launch/tpu_pod.sh --config.init.clip=/mnt/shared/clip_l14 \
#       --config.init.llm=/mnt/shared/llama3_8b --config.tokenizer=/mnt/shared/llama3_8b \
#       --config.data.batch_size=64
#
# Arguments go to `python -m puma_jax.main` on each worker. `--config.distributed.auto=True`
# is added: on a TPU VM, `jax.distributed.initialize()` discovers the coordinator, the process
# count and this worker's id from the TPU metadata. data.batch_size is *per host*: for the
# paper's 2048 examples set it to 2048 / (number of workers), e.g. 64 on a v4-256 (32 hosts).
# Check memory first: python -m puma_jax.tools.memory_plan --config=$CONFIG --devices=128 \
#   --device_memory_gb=32 --processes=32    (a v4-256 has 128 chips of 32 GiB HBM)
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT optional (else gcloud's default)
#   WORKDIR          checkpoints and metrics; must be one directory every worker sees (an NFS /
#                    Filestore mount or a gcsfuse mount of a bucket)
#   CONFIG           default configs/pretrain.py:paper
#   REPO_DIR         the checkout on the workers (default: puma_jax in the login directory)
#   SYNC=1           first copy this checkout's tracked files to REPO_DIR on every worker
#   SETUP            shell run on every worker before training (e.g. "pip install -r requirements.txt")
#   PYTHON           default python3
#   DRY_RUN=1        print the gcloud commands instead of running them
# Logs of every worker stream here, prefixed by gcloud with the worker number. Ctrl-C stops the
# local ssh sessions; to stop the job itself run the same script with STOP=1 (pkills the
# training process, by the exact command line this script starts, on all workers).
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME (the TPU VM name)}
ZONE=${ZONE:?set ZONE (the TPU zone)}
CONFIG=${CONFIG:-configs/pretrain.py:paper}
REPO_DIR=${REPO_DIR:-puma_jax}
PYTHON=${PYTHON:-python3}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("$TPU_NAME" --zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ "${STOP:-0}" == 1 ]]; then
  run "${gcloud_tpu[@]}" ssh "${where[@]}" --command="pkill -TERM -f '^$PYTHON -m puma_jax.main' || true"
  exit 0
fi
WORKDIR=${WORKDIR:?set WORKDIR to a directory every worker sees}

if [[ "${SYNC:-0}" == 1 ]]; then
  tarball=$(mktemp /tmp/puma_jax_src.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  git ls-files -z | tar --null -czf "$tarball" -T -
  run "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:/tmp/puma_jax_src.tar.gz" --zone="$ZONE" \
    --worker=all ${PROJECT:+--project="$PROJECT"}
  run "${gcloud_tpu[@]}" ssh "${where[@]}" \
    --command="mkdir -p $(printf '%q' "$REPO_DIR") && tar -xzf /tmp/puma_jax_src.tar.gz -C $(printf '%q' "$REPO_DIR")"
fi

args=$(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" --config.distributed.auto=True "$@")
remote="cd $(printf '%q' "$REPO_DIR") && ${SETUP:+$SETUP && }TF_CPP_MIN_LOG_LEVEL=3 $PYTHON -m puma_jax.main $args"
run "${gcloud_tpu[@]}" ssh "${where[@]}" --command="$remote"
