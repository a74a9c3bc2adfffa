"""Steps that do not log never wait for the GPU: ``torch.cuda.set_sync_debug_mode("error")`` is on
around every such step (``train_helper.SyncDebug``), so any implicit host-device synchronization
there (an ``.item()``, a ``.tolist()``, a blocking copy) raises and fails the run; the explicit ones
that mode lets pass (``Event.synchronize``, as the stop vote once did every step,
``Stream.synchronize``, ``torch.cuda.synchronize``) are counted in the same steps and must be none."""
import pytest

from tests.gpu.conftest import last_json, launch, train_overrides

pytestmark = pytest.mark.gpu

STEPS, LOG_INTERVAL = 12, 10
# The coming step k is a log step when k % 10 == 0, k == 1 or k == 12: the others run under "error".
QUIET_STEPS = [k for k in range(1, STEPS + 1) if not (k % LOG_INTERVAL == 0 or k == 1 or k == STEPS)]


@pytest.mark.parametrize("path", ["one_process_unwrapped", "fsdp2_all_gpus", "fsdp2_all_gpus_compiled"])
def test_no_host_sync_on_non_log_steps(shards, tmp_path, gpus, path, record):
    extra = [f"trainer.log_interval={LOG_INTERVAL}"]
    if path != "one_process_unwrapped":
        extra.append("backend.always_shard=true")
    if path.endswith("compiled"):
        import torch

        from slimpajama_train.backends.hardware import compile_problem

        if problem := compile_problem(torch.device("cuda", 0)):
            pytest.skip(problem)
        extra.append("trainer.compile=true")
    nproc = 1 if path == "one_process_unwrapped" else gpus
    proc = launch(nproc, ["--sync-debug", *train_overrides(shards, tmp_path, *extra, steps=STEPS)],
                  torchrun=nproc > 1 or path != "one_process_unwrapped", timeout=420)
    summary = last_json(proc.stdout)
    record(path=path, gpus=nproc, error_mode_steps=summary["sync_debug_error_steps"],
           explicit_syncs=summary["explicit_syncs_on_quiet_steps"])
    assert summary["step"] == STEPS and not summary["preempted"]
    assert summary["sync_debug_error_steps"] == QUIET_STEPS
    assert summary["explicit_syncs_on_quiet_steps"] == {}
