#!/usr/bin/env bash
# Submit every data-prep stage as a SLURM array job, each depending on the previous one:
#   launch/slurm/prep.sh 64 'inputs=[train/chunk*/example_train_*.jsonl.zst]' input_root=/data/SlimPajama \
#       output_dir=/data/shards prep_mixture=slimpajama tokenizer=bpe_32k seq_len=2048
# Parallel stages get --array=0-(N-1), single-task stages --array=0-0; each waits for the previous
# with --dependency=afterok:<job>. Prints the job ids. SBATCH_EXTRA adds sbatch options (partition...).
# The stage list comes from data_prep/stages.py (STAGES), so this script never falls out of step.
# Memory: parallel tasks fit prep.sbatch's 8 GB at SlimPajama scale (590 M documents, 64 tasks; see
# benchmarks/bench_prep_scale.py). The single-task stages that hold a number per document of the
# whole corpus (components, plan; split streams one part at a time but is given the same margin)
# and the tokenizer trainer (up to ~10 GB for bpe_32k, 16 threads) get BIG_MEM_GB instead (default
# 64), the tokenizer with TOKENIZER_CPUS CPUs (default 16). The request is written as --mem-per-cpu
# (BIG_MEM_GB / CPUs), the same kind prep.sbatch sets: sbatch refuses --mem next to --mem-per-cpu.
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
PYTHON=${PYTHON:-python}
BIG_MEM_GB=${BIG_MEM_GB:-64}
TOKENIZER_CPUS=${TOKENIZER_CPUS:-16}
TOKENIZER_MEM_PER_CPU_MB=$((BIG_MEM_GB * 1024 / TOKENIZER_CPUS))
STAGES=$("$PYTHON" -c 'from data_prep.stages import STAGES; print(" ".join(f"{s.name}:{int(s.parallel)}" for s in STAGES))')
prev=""
for entry in $STAGES; do
  stage=${entry%%:*}
  if [[ ${entry##*:} == 1 ]]; then last=$((N - 1)); else last=0; fi
  res=()
  case $stage in
    components|split|plan) res=(--mem-per-cpu="${BIG_MEM_GB}G") ;;
    tokenizer) res=(--mem-per-cpu="${TOKENIZER_MEM_PER_CPU_MB}M" --cpus-per-task="$TOKENIZER_CPUS") ;;
  esac
  dep=()
  if [[ -n $prev ]]; then dep=(--dependency="afterok:$prev"); fi
  # shellcheck disable=SC2086  # SBATCH_EXTRA is a list of options
  prev=$($SBATCH --parsable ${SBATCH_EXTRA:-} "${res[@]}" --job-name="prep-$stage" --array="0-$last" "${dep[@]}" \
    "$HERE/prep.sbatch" "$stage" "run.num_tasks=$N" "$@")
  prev=${prev%%;*}  # --parsable prints "jobid[;cluster]"
  echo "$stage: job $prev (tasks 0-$last)"
done
