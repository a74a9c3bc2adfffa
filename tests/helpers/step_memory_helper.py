"""Test helper, run under torchrun with Hydra overrides: train through the real Trainer and measure,
with :class:`~tests.helpers.tensor_memory.LiveTensorBytes`, the tensor memory each optimizer
step's micro-batches create (deterministic: no RSS, no allocator).

Writes, per case, ``<out>.rank<r>`` (JSON) for steps 2 and later (step 1 also creates the optimizer
state): ``peak_bytes``, the most bytes alive at once during a step's forward/backward passes
(activations saved for backward, temporaries, gradients, gathered ZeRO-3 parameters), and
``held_between_micro_bytes``, the most bytes still alive after a micro-batch that is not the step's
last (what gradient accumulation holds), plus ``unsharded_grad_bytes`` and ``grad_accum``."""
import json
from pathlib import Path

from slimpajama_train.trainer import Trainer
from tests.helpers.tensor_memory import LiveTensorBytes
from tests.helpers.trainer_cases import run_cases


def measure(trainer: Trainer, out: str) -> None:
    """Train ``trainer`` to its end, measuring each step's micro-batches; write ``out.rank<r>``."""
    peaks: list[int] = []
    held: list[int] = []
    state: dict = {"mode": None}
    forward_backward = trainer.backend.forward_backward

    def measured(batch, last_micro):
        if state["mode"] is None:  # the step's first micro-batch: count from here to its last
            state["mode"] = LiveTensorBytes().__enter__()
        mode = state["mode"]
        loss = forward_backward(batch, last_micro)
        measured_step = trainer.step >= 1  # trainer.step counts finished steps: this is step 2 or later
        if not last_micro:
            if measured_step:
                held.append(mode.live_bytes())
            return loss
        mode.__exit__(None, None, None)
        state["mode"] = None
        if measured_step:
            peaks.append(mode.peak)
        return loss

    trainer.backend.forward_backward = measured
    trainer.fit()
    # A DTensor's numel() is the global (unsharded) count; ZeRO-3 keeps it in ds_numel.
    unsharded = sum(getattr(p, "ds_numel", p.numel()) * 4 for p in trainer.backend.model.parameters())
    Path(f"{out}.rank{trainer.dist.rank}").write_text(json.dumps(
        {"peak_bytes": max(peaks), "peaks": peaks, "held_between_micro_bytes": max(held, default=0),
         "unsharded_grad_bytes": unsharded, "grad_accum": trainer.grad_accum}))


def main() -> None:
    """Each case of ``$STEP_MEMORY_CASES`` (a JSON list of ``{"overrides": [...], "out": path}``) in
    turn, in this one launch: a fresh Trainer per case; the figures count only the tensors a step's
    own operators create, so a case before it does not change them."""
    run_cases("STEP_MEMORY_CASES", lambda trainer, case: measure(trainer, case["out"]))


if __name__ == "__main__":
    main()
