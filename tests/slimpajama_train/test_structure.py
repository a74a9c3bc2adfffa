"""The trainer's pieces each own one job: no import cycles, configs that do not import callbacks,
a resolved config that is a new object, a checkpointer that decides when to save, explicit timeouts."""
import ast
import copy
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from slimpajama_train.checkpoint import CheckpointConfig, Checkpointer
from slimpajama_train.config import TrainConfig, batch_suggestions, config_hash, resolve_config
from tests.conftest import REPO

PACKAGE = REPO / "slimpajama_train"


def _module_imports() -> dict[str, set[str]]:
    """Module -> the slimpajama_train modules it imports at import time (TYPE_CHECKING blocks and
    imports inside functions excluded: they do not form import-time cycles)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        tree = ast.parse(path.read_text())
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in [node] if not isinstance(node, ast.Try) else node.body:
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("slimpajama_train"):
                    deps.add(sub.module)
                    deps.update(f"{sub.module}.{a.name}" for a in sub.names)
                elif isinstance(sub, ast.Import):
                    deps.update(a.name for a in sub.names if a.name.startswith("slimpajama_train"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = _module_imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "slimpajama_train.trainer" in graph["slimpajama_train.train"]


def test_configs_import_no_callback_module():
    graph = _module_imports()
    callback_modules = {m for m in graph if m.startswith("slimpajama_train.callbacks.") and not m.endswith(".config")}
    for config_module in ("slimpajama_train.config", "slimpajama_train.callbacks.config", "slimpajama_train.callbacks"):
        assert not graph[config_module] & callback_modules, (config_module, graph[config_module])
    # and at run time: importing the root config loads none of them
    code = ("import sys, slimpajama_train.config; "
            "print([m for m in sys.modules "
            "if m.startswith('slimpajama_train.callbacks.') and not m.endswith('.config')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (``from a import b`` counts
    as ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_the_package_is_laid_out_by_job():
    """The core at the root, the data pipeline of a rank in ``data/``, the tools in ``tools/``; the
    training core imports nothing from ``tools/`` and the backends nothing from ``checkpoint``
    (anywhere in the module, functions included)."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert root == ["checkpoint", "chunked_loss", "config", "distributed", "log_window", "mfu", "model", "optim",
                    "preemption", "safe_load", "train", "trainer"]
    assert sorted(p.stem for p in (PACKAGE / "data").glob("*.py")) == ["__init__", "dataset", "loader", "order",
                                                                        "shard_cache", "workers"]
    tools = {p.stem for p in (PACKAGE / "tools").glob("*.py")} - {"__init__"}
    assert tools == {"demo", "evaluate", "export", "generate", "hf_tokenizer", "lm_eval_adapter", "load_checkpoint",
                     "plot", "study"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        imports = _all_imports(path)
        if not name.startswith("slimpajama_train.tools"):
            offenders += [(name, m) for m in imports if m.startswith("slimpajama_train.tools")]
        if name.startswith("slimpajama_train.backends"):
            offenders += [(name, m) for m in imports if m.split(".")[:2] == ["slimpajama_train", "checkpoint"]]
    assert not offenders, offenders


MANIFEST = {"seq_len": 64, "tokenizer": {"vocab_size": 1000}}


def test_resolved_config_is_a_new_object_and_the_given_one_is_untouched():
    cfg = TrainConfig(resume_from="/ckpt/step_00000004")
    cfg.trainer.global_batch_tokens = 64 * 16
    before = copy.deepcopy(asdict(cfg))
    resolved = resolve_config(cfg, MANIFEST, world_size=2)
    assert asdict(cfg) == before  # nothing written into the caller's config
    assert resolved is not cfg and resolved.model is not cfg.model and resolved.trainer is not cfg.trainer
    assert (resolved.model.vocab_size, resolved.model.max_seq_len) == (1000, 64)
    assert resolved.trainer.global_batch_size == 16 and resolved.checkpoint.resume == "/ckpt/step_00000004"
    assert config_hash(resolved) != config_hash(cfg)


def test_batch_that_does_not_divide_names_values_that_would():
    from slimpajama_train.config import TrainerConfig
    from slimpajama_train.data.dataset import DataConfig

    # the 1.3B recipe's 512 samples at micro-batch 4 on 384 GPUs: 1536 samples per accumulation step
    cfg = TrainConfig(trainer=TrainerConfig(global_batch_size=512), data=DataConfig(micro_batch_size=4))
    with pytest.raises(ValueError) as err:
        resolve_config(cfg, MANIFEST, world_size=384)
    msg = str(err.value)
    assert "global batch of 512" in msg and "world size 384" in msg, msg
    assert "trainer.global_batch_size in [1536]" in msg, msg
    assert "a world size in [16, 32, 64, 128]" in msg, msg  # 512 = 4 x 128: the nearest that divide
    assert "[384, 768]" in batch_suggestions(512, 4, 96)
    assert "data.micro_batch_size in [1, 2]" in batch_suggestions(64, 4, 32)  # 64 = 2 x 32


def test_resolved_config_is_recorded_with_its_hash(tmp_path, demo_shards):
    from tests.conftest import tiny_train_overrides
    from tests.helpers.launch import run_ranks

    run_ranks(1, tiny_train_overrides(demo_shards, tmp_path, "trainer.global_batch_tokens=512", steps=1), cwd=REPO)
    recorded = json.loads((tmp_path / "config.json").read_text())
    meta = json.loads((tmp_path / "checkpoints/step_00000001/meta.json").read_text())
    assert recorded["config"]["model"]["vocab_size"] == 1000 and recorded["config"]["trainer"]["global_batch_size"] == 8
    assert recorded["config_hash"] == meta["config_hash"] == config_hash(TrainConfig(**_from_dict(recorded["config"])))


def _from_dict(d: dict) -> dict:
    """Rebuild the nested config dataclasses from their asdict() form."""
    from slimpajama_train import config as c
    from slimpajama_train.backends.base import BackendConfig
    from slimpajama_train.callbacks.config import LoggerConfig, WandbConfig
    from slimpajama_train.checkpoint import CheckpointConfig
    from slimpajama_train.data.dataset import DataConfig
    from slimpajama_train.distributed import DistConfig
    from slimpajama_train.model import ModelConfig
    from slimpajama_train.optim import OptimConfig

    kinds = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "backend": BackendConfig,
             "trainer": c.TrainerConfig, "checkpoint": CheckpointConfig, "dist": DistConfig}
    out = {k: kinds[k](**v) if k in kinds else v for k, v in d.items()}
    out["logger"] = LoggerConfig(**{**d["logger"], "wandb": WandbConfig(**d["logger"]["wandb"])})
    return out


class _State:
    def __init__(self) -> None:
        self.pulled = []

    def state_dict(self) -> dict:
        self.pulled.append(True)
        return {"samples_consumed": 0}

    def load_state_dict(self, meta: dict) -> None:
        self.loaded = meta


class _Backend:
    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "shard.bin").write_bytes(b"x")

    def load(self, path: Path) -> None:
        self.loaded_from = path


def test_checkpointer_decides_when_to_save_and_pulls_the_state(tmp_path):
    state, backend = _State(), _Backend()
    ckpt = Checkpointer(CheckpointConfig(interval=3, keep_last=0), tmp_path, backend, state, log=lambda m: None)
    saved = [step for step in range(1, 8) if ckpt.step_end(step)]
    assert saved == [3, 6] and len(state.pulled) == 2
    ckpt.finish(7)  # the last step is saved once, at the end
    ckpt.finish(7)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000006", "step_00000007"]
    assert len(state.pulled) == 3 and ckpt.last_saved_step == 7
    again = Checkpointer(CheckpointConfig(interval=3), tmp_path, backend, _State(), log=lambda m: None)
    meta = again.resume()
    assert meta["step"] == 7 and again.state.loaded["path"].endswith("step_00000007") and again.last_saved_step == 7
    fresh = Checkpointer(CheckpointConfig(), tmp_path / "none", backend, _State(), log=lambda m: None)
    fresh.finish(0)  # nothing trained: nothing to save
    assert not (tmp_path / "none").exists()


def test_process_group_timeouts_are_explicit():
    code = """
import torch, torch.distributed.distributed_c10d as c
from slimpajama_train.distributed import DistConfig, init_distributed, set_collective_timeout
init_distributed(DistConfig(init_timeout_s=1234, step_timeout_s=99))
backend = c._get_default_group()._get_backend(torch.device("cpu"))
print(backend.options._timeout.total_seconds())
set_collective_timeout(99)
print(backend.options._timeout.total_seconds())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1234.0", "99.0"]
