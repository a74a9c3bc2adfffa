"""Steps that do not log never wait for the device, and add one small asynchronous collective (the
stop vote, a host tensor over a gloo group) to the training's own. Counted by instrumenting tensor
reads, CUDA event and stream synchronizations, waits on collectives and the collectives themselves
(sync_probe.py) in a 12-step run with log_interval=10: steps 2-9 and 11 are non-log steps."""
import json
from collections import Counter

import pytest

from tests.helpers.launch import HELPERS, run_ranks

pytestmark = pytest.mark.slow  # every test here: `make test-fast` leaves the module out

VOTE = "all_reduce[1]async=True@group"  # on the gloo group of distributed.host_group()
VOTE_WAIT = "all_reduce.wait@slimpajama_train:distributed.py:"


def _probe(demo_shards, tmp_path, backend: str, **env_extra: str) -> dict:
    out = tmp_path / "sync"
    overrides = [f"data.path={demo_shards}", f"run_dir={tmp_path / 'run'}",
                 f"backend={backend}", "backend.precision=fp32", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                 "data.micro_batch_size=2", "data.num_workers=1", "trainer.global_batch_size=8",
                 "trainer.max_steps=12", "trainer.log_interval=10", "trainer.eval_interval=0", "checkpoint.interval=0",
                 "logger.wandb.enabled=false", *env_extra.get("SYNC_EXTRA", "").split()]
    run_ranks(2, overrides, script=HELPERS / "sync_probe.py", extra_env={"SYNC_OUT": str(out), **env_extra})
    return {r: json.loads((tmp_path / f"sync.rank{r}").read_text()) for r in (0, 1)}


@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_no_host_sync_and_one_async_collective_on_non_log_steps(demo_shards, tmp_path, backend):
    for rank, probe in _probe(demo_shards, tmp_path, backend).items():
        quiet = [s for s in range(1, probe["max_steps"] + 1) if s not in probe["log_steps"]]
        assert quiet == [2, 3, 4, 5, 6, 7, 8, 9, 11]
        bare_syncs = Counter(probe["syncs"].get("bare1", {}))
        bare_colls = Counter(probe["collectives"].get("bare1", {}))
        ours = {s: {k: n for k, n in probe["syncs"].get(str(s), {}).items() if "@slimpajama_train:" in k}
                for s in quiet}
        count = [sum(probe["syncs"].get(str(s), {}).values()) for s in quiet]
        at_log = [sum(probe["syncs"].get(str(s), {}).values()) for s in probe["log_steps"]]
        print(f"{backend} rank {rank}: host syncs per non-log step {count} (the backend's bare step: "
              f"{sum(bare_syncs.values())}: {dict(bare_syncs)}); per log step {at_log}")
        # The stop vote never waits for the device: no CUDA event or stream synchronization, no wait
        # on a collective over a device tensor; its one wait per step is on gloo's host thread.
        device_waits = {s: probe["device_waits"].get(str(s)) for s in quiet}
        host_waits = [probe["host_waits"].get(str(s), {}) for s in quiet]
        print(f"{backend} rank {rank}: device waits per non-log step {device_waits}; host waits {host_waits[0]}")
        assert not any(device_waits.values()) and not probe["device_waits"].get("bare1"), device_waits
        assert all(len(w) == 1 and next(iter(w)).startswith(VOTE_WAIT) and sum(w.values()) == 1 for w in host_waits)
        assert not any(ours.values()), f"the trainer synchronizes on non-log steps: {ours}"
        for s in quiet:
            syncs = Counter(probe["syncs"].get(str(s), {}))
            # Nothing beyond what the backend's own forward/backward/step does (FSDP2: nothing at all;
            # DeepSpeed checks its gradients for overflow on the host inside engine.step()).
            assert syncs == bare_syncs, (s, syncs, bare_syncs)
            colls = Counter(probe["collectives"].get(str(s), {}))
            assert colls - bare_colls == Counter({VOTE: 1}) and not bare_colls - colls, (s, colls, bare_colls)
        if backend == "fsdp2":
            assert not bare_syncs
        for s in probe["log_steps"][:-1]:  # a log step reads everything in one transfer after one gather
            mine = {k: n for k, n in probe["syncs"][str(s)].items() if "@slimpajama_train:" in k}
            assert len(mine) == 1 and next(iter(mine)).startswith("tolist@") and sum(mine.values()) == 1, mine


def test_log_steps_report_the_straggler(demo_shards, tmp_path):
    """Rank 1's input arrives 50 ms late per micro-batch: the log records name it, with the data
    wait and host step time as max/min over the ranks (gathered in the log step's one collective)."""
    from tests.conftest import read_metrics

    _probe(demo_shards, tmp_path, "fsdp2", SLOW_DATA_RANK="1", SLOW_DATA_S="0.05")
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 10, 12]
    for m in logged:
        print({k: m[k] for k in m if "time" in k or "wait" in k or "slowest" in k})
        assert m["slowest_data_rank"] == 1
        assert m["data_wait_max_s"] >= 2 * 0.05 > m["data_wait_min_s"]  # 2 micro-batches per step and rank
        assert m["step_time_max_s"] >= m["step_time_min_s"] > 0 and m["step_time_s"] >= 2 * 0.05


def test_garbage_collector_frozen_and_run_on_all_ranks_at_the_same_steps(demo_shards, tmp_path):
    for probe in _probe(demo_shards, tmp_path, "fsdp2", **{"SYNC_EXTRA": "trainer.gc_interval=5"}).values():
        assert probe["gc_runs"] == {"5": [1], "10": [1]}  # young generations, at the same steps everywhere
        assert all(not enabled and frozen > 1000 for enabled, frozen in probe["gc_state"].values())
        assert probe["gc_enabled_after"]  # restored when fit() returns


def test_validation_reads_the_device_once_per_evaluation(demo_shards, tmp_path):
    """Evaluation at step 5 (not a log step) over 3 global batches through the worker loader: one
    device-to-host transfer for the whole evaluation, none per batch, and one all-reduce."""
    extra = "trainer.eval_interval=5 trainer.eval_batches=3"
    for probe in _probe(demo_shards, tmp_path, "fsdp2", SYNC_EXTRA=extra).values():
        mine = {k: n for k, n in probe["syncs"]["5"].items() if "@slimpajama_train:" in k}
        assert sum(mine.values()) == 1 and next(iter(mine)).startswith("tolist@"), mine
        assert sum(probe["syncs"]["5"].values()) == 1  # nothing else either
        extra_colls = Counter(probe["collectives"]["5"]) - Counter(probe["collectives"]["bare1"])
        # the evaluation's one all-reduce: loss sum and count per source plus a mixed-shard slot
        assert sorted(extra_colls) == sorted([VOTE, next(k for k in extra_colls if k.startswith("all_reduce[") and
                                                         k.endswith("async=False@default"))]), extra_colls
        assert sum(extra_colls.values()) == 2, extra_colls
