#!/usr/bin/env bash
# Submit every data-prep stage as a SLURM array job, each depending on the previous one:
#   launch/slurm/prep.sh 64 'inputs=[train/chunk*/example_train_*.jsonl.zst]' input_root=/data/SlimPajama \
#       output_dir=/data/shards prep_mixture=slimpajama tokenizer=bpe_32k seq_len=2048
# Parallel stages get --array=0-(N-1), single-task stages --array=0-0; each waits for the previous
# with --dependency=afterok:<job>. Prints the job ids. SBATCH_EXTRA adds sbatch options (partition...).
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_TASKS [hydra overrides...]" >&2
  exit 2
fi
N=$1
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SBATCH=${SBATCH:-sbatch}
mkdir -p logs  # prep.sbatch writes logs/%x-%A_%a.out; SLURM opens it before the script runs
PARALLEL=" clean signatures buckets clusters tokenize shards "
prev=""
for stage in clean signatures buckets clusters split tokenizer tokenize plan shards report; do
  if [[ $PARALLEL == *" $stage "* ]]; then last=$((N - 1)); else last=0; fi
  dep=()
  if [[ -n $prev ]]; then dep=(--dependency="afterok:$prev"); fi
  # shellcheck disable=SC2086  # SBATCH_EXTRA is a list of options
  prev=$($SBATCH --parsable ${SBATCH_EXTRA:-} --job-name="prep-$stage" --array="0-$last" "${dep[@]}" \
    "$HERE/prep.sbatch" "$stage" "num_tasks=$N" "$@")
  prev=${prev%%;*}  # --parsable prints "jobid[;cluster]"
  echo "$stage: job $prev (tasks 0-$last)"
done
