#!/usr/bin/env bash
# bigjax on a Cloud TPU pod slice: create (or reuse) the TPU VMs with gcloud, install bigjax on every
# worker, run the same `bigjax train` on all of them, and collect one log per worker.
#
# Needs: gcloud, logged in, with a default project (or $PROJECT); quota for the accelerator; a
# run.dir every worker reaches: gs://BUCKET/PATH (the workers get bigjax[gcs]; their service
# account needs write access), or a disk mounted at the same path on all of them (NFS, Filestore).
# Usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG [key=value ...]
# Example:
#   launch/tpu_pod.sh bigjax-pod us-central2-b v4-32 configs/gpt_tiny.yaml \
#     run.dir=gs://my-bucket/runs/gpt mesh.fsdp=4
#
# Environment: PROJECT, RUNTIME (TPU software version, default tpu-ubuntu2204-base),
# SPOT=1 (spot VMs), LOG_DIR (default logs/NAME), DRY_RUN=1 (print the gcloud commands only).
# The workers find each other through JAX's TPU detection (BIGJAX_COORDINATOR=auto).
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '8,11p' "$0" | sed 's/^# //' >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
config=$1
[[ -f $config ]] || { echo "tpu_pod.sh: config file '$config' does not exist" >&2; exit 2; }
runtime=${RUNTIME:-tpu-ubuntu2204-base}
log_dir=${LOG_DIR:-logs/$name}
repo=$(cd "$(dirname "$0")/.." && pwd)
project_flag=()
[[ -n ${PROJECT:-} ]] && project_flag=(--project="$PROJECT")

run() {  # echo, then run unless DRY_RUN=1
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ ${DRY_RUN:-0} == 1 ]] || "$@"
}
tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$zone" "${project_flag[@]}"; }

# 1. create the slice unless it exists
if [[ ${DRY_RUN:-0} == 1 ]] || ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" \
    "${project_flag[@]}" >/dev/null 2>&1; then
  spot=()
  [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
  tpu create "$name" --accelerator-type="$accelerator" --version="$runtime" "${spot[@]}"
fi

# 2. the same bigjax on every worker: this checkout, packed and installed with jax[tpu]
archive=$(mktemp "${TMPDIR:-/tmp}/bigjax.XXXXXX.tar.gz")
trap 'rm -f "$archive"' EXIT
tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=.git --exclude=runs .
tpu scp "$archive" "$name:bigjax.tar.gz" --worker=all
tpu ssh "$name" --worker=all --command="mkdir -p bigjax && tar -xzf bigjax.tar.gz -C bigjax \
&& pip install -q 'jax[tpu]' -e './bigjax[gcs]'"

# 3. one command on all workers; each keeps its own log
cmd=(python3 -u -m bigjax.cli train "$@")
printf -v quoted ' %q' "${cmd[@]}"
tpu ssh "$name" --worker=all --command="cd bigjax && BIGJAX_COORDINATOR=auto${quoted} \
> ~/bigjax-train.log 2>&1; status=\$?; tail -n 20 ~/bigjax-train.log; exit \$status" \
  || status=$?

# 4. logs/NAME/worker-<i>.log, whatever the outcome
mkdir -p "$log_dir"
workers=${TPU_WORKERS:-$(gcloud compute tpus tpu-vm describe "$name" --zone="$zone" \
  "${project_flag[@]}" --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)}
for ((w = 0; w < workers; w++)); do
  tpu scp "$name:bigjax-train.log" "$log_dir/worker-$w.log" --worker="$w" || true
done
echo "tpu_pod.sh: logs in $log_dir (delete the slice: gcloud compute tpus tpu-vm delete $name --zone=$zone)"
exit "${status:-0}"
