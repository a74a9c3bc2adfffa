"""The GPU tests' own helpers, checked on any machine (not marked ``gpu``: they run in the CPU suite)."""
import pytest

from tests.gpu import train_helper
from tests.gpu.test_host_syncs import LOG_INTERVAL, QUIET_STEPS, STEPS


def test_overrides_build_a_train_config():
    cfg = train_helper.config_from_overrides(
        ["data.path=/d", "run_dir=/r", "backend.always_shard=true", "optim.lr=1e-3", "trainer.max_steps=12",
         "checkpoint.resume=none", "logger.wandb.enabled=false", "model.n_kv_heads=4"])
    assert cfg.data.path == "/d" and cfg.run_dir == "/r" and cfg.backend.always_shard is True
    assert cfg.optim.lr == 1e-3 and cfg.trainer.max_steps == 12 and cfg.checkpoint.resume == "none"
    assert cfg.logger.wandb.enabled is False and cfg.model.n_kv_heads == 4
    with pytest.raises(SystemExit, match="no field 'nope'"):
        train_helper.config_from_overrides(["trainer.nope=1"])
    with pytest.raises(SystemExit, match="not key=value"):
        train_helper.config_from_overrides(["trainer.max_steps"])


class _Trainer:
    def __init__(self, overrides):
        self.cfg = train_helper.config_from_overrides(overrides)
        self.step = 0


def test_sync_debug_errors_exactly_on_quiet_steps(monkeypatch):
    modes = []
    monkeypatch.setattr(train_helper.torch.cuda, "set_sync_debug_mode", modes.append)
    trainer = _Trainer([f"trainer.max_steps={STEPS}", f"trainer.log_interval={LOG_INTERVAL}",
                        "trainer.eval_interval=0", "checkpoint.interval=0"])
    cb = train_helper.SyncDebug()
    for step in range(STEPS):
        trainer.step = step  # steps done; the coming one is step + 1
        cb.on_step_start(trainer)
    cb.on_train_end(trainer)
    assert QUIET_STEPS == [2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert cb.error_steps == QUIET_STEPS
    assert modes == ["error" if k in QUIET_STEPS else "default" for k in range(1, STEPS + 1)] + ["default"]
    # eval and checkpoint steps read the device too: not quiet
    trainer = _Trainer(["trainer.max_steps=12", "trainer.log_interval=10", "trainer.eval_interval=4",
                        "checkpoint.interval=6"])
    cb = train_helper.SyncDebug()
    for step in range(12):
        trainer.step = step
        cb.on_step_start(trainer)
    assert cb.error_steps == [2, 3, 5, 7, 9, 11]


def test_sync_debug_counts_explicit_syncs_on_quiet_steps_only(monkeypatch):
    """``Event.synchronize`` passes the error mode unnoticed: SyncDebug counts it, per caller, in the
    quiet steps (here a stand-in for the CUDA method, called once per step as the old stop vote did)."""
    torch = train_helper.torch
    real: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: real.append(1))
    trainer = _Trainer([f"trainer.max_steps={STEPS}", f"trainer.log_interval={LOG_INTERVAL}",
                        "trainer.eval_interval=0", "checkpoint.interval=0"])
    cb = train_helper.SyncDebug()
    cb.on_train_start(trainer)
    for step in range(STEPS):
        trainer.step = step
        cb.on_step_start(trainer)
        torch.cuda.Event.synchronize(object())
    cb.on_train_end(trainer)
    torch.cuda.Event.synchronize(object())  # after the run: not counted, and the stand-in is back
    assert len(real) == STEPS + 1
    ((where, calls),) = cb.explicit_syncs.items()
    assert calls == len(QUIET_STEPS) and where.startswith("test_helpers_cpu.py:") and where.endswith(
        " Event.synchronize")
