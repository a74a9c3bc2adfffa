#!/usr/bin/env bash
# Wheels that `make gpu-check` (benchmarks/gpu_check.py) needs beyond a bare GPU image (python3 3.12 with
# torch, numpy, pyyaml, tqdm, ...): pytest and what it imports. Nothing else: the GPU tests and benchmarks
# import no Hydra/omegaconf (tests/gpu/train_helper.py builds TrainConfig itself), no DeepSpeed (imported
# only for backend=deepspeed), no W&B (logger.wandb.enabled=false) and no data_prep dependencies (zstandard,
# rensa, matplotlib: synthetic shards, benchmarks/bench_train.write_synthetic_shards).
#
# Downloads them for CPython 3.12 on x86_64 Linux into .whl/ (ignored through .git/info/exclude), for a host
# without a package index:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${DEST:-.whl}
WHEELS=(
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0  # pytest 9 and its requirements
    pytest-timeout==2.4.0                                                          # pyproject's `timeout`
)
mkdir -p "$DEST"
if [ -d .git/info ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
    echo '/.whl/' >> .git/info/exclude
fi
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
