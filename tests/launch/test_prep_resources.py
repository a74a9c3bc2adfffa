"""launch/slurm/prep.sh asks SLURM for what each stage needs: the tokenizer trainer's memory estimate
for every shipped tokenizer config fits what its stage requests, and the stage list is the code's."""
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from data_prep.stages import STAGES
from data_prep.tokenizer import TokenizerConfig, sample_cap, trainer_memory_mb
from tests.conftest import REPO


def _mb(size: str) -> int:
    """SLURM memory size (``8G``, ``64000M``, ``512``) in MB."""
    m = re.fullmatch(r"(\d+)([KMGT]?)", size)
    assert m, size
    return int(m.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "": 1}[m.group(2)]


def _submitted(tmp_path) -> dict[str, list[str]]:
    """The sbatch options prep.sh passes for each stage (a stand-in sbatch records them)."""
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "sbatch"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\necho 7\n')
    fake.chmod(0o755)
    env = {**os.environ, "SBATCH": str(fake), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    for k in ("BIG_MEM_GB", "TOKENIZER_CPUS", "SBATCH_EXTRA"):
        env.pop(k, None)
    proc = subprocess.run(["bash", str(REPO / "launch/slurm/prep.sh"), "64", "tokenizer=bpe_32k"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = {}
    for line in log.read_text().splitlines():
        stage = re.search(r"--job-name=prep-(\S+)", line).group(1)
        calls[stage] = line.split()
    return calls


def _sbatch_default(option: str) -> str:
    text = (REPO / "launch/slurm/prep.sbatch").read_text()
    return re.search(rf"#SBATCH --{option}=(\S+)", text).group(1)


def test_stage_list_and_array_sizes_come_from_the_code(tmp_path):
    calls = _submitted(tmp_path)
    assert list(calls) == [s.name for s in STAGES]
    for s in STAGES:
        assert f"--array=0-{63 if s.parallel else 0}" in calls[s.name]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf/tokenizer").glob("*.yaml")))
def test_tokenizer_memory_estimate_fits_the_stage_request(tmp_path, name):
    raw = OmegaConf.to_container(OmegaConf.load(REPO / f"conf/tokenizer/{name}.yaml"))
    if raw.get("model_path") not in (None,):
        pytest.skip(f"tokenizer={name} copies an existing model (nothing is trained)")
    cfg = TokenizerConfig(**raw)
    args = _submitted(tmp_path)["tokenizer"]
    per_cpu = [a.split("=", 1)[1] for a in args if a.startswith("--mem-per-cpu=")]
    cpus = [a.split("=", 1)[1] for a in args if a.startswith("--cpus-per-task=")]
    ncpu = int(cpus[-1]) if cpus else int(_sbatch_default("cpus-per-task"))
    requested = (_mb(per_cpu[-1]) if per_cpu else _mb(_sbatch_default("mem-per-cpu"))) * ncpu
    need = trainer_memory_mb(sample_cap(cfg))
    print(f"tokenizer={name}: estimate {need} MB for a {sample_cap(cfg) / 1e6:.0f} MB sample; requested "
          f"{requested:.0f} MB and {ncpu} CPUs for {cfg.threads} threads")
    assert need <= requested, f"tokenizer={name} needs ~{need} MB, the tokenizer stage asks for {requested} MB"
    assert cfg.threads <= ncpu


def test_parallel_stages_keep_the_default_request(tmp_path):
    calls = _submitted(tmp_path)
    for s in STAGES:
        # sbatch refuses --mem next to prep.sbatch's --mem-per-cpu, so only the latter may appear
        assert not any(a.startswith(("--mem=", "--mem-per-gpu")) for a in calls[s.name]), s.name
        big = any(a.startswith("--mem-per-cpu=") for a in calls[s.name])
        assert big == (s.name in ("components", "split", "plan", "tokenizer")), s.name
        if s.parallel:
            assert not big  # every parallel task fits prep.sbatch's 8 GB default (bench_prep_scale.py)
