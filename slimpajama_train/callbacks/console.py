"""Console progress: a tqdm bar over steps and one plain line per logged step (survives non-tty logs)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from slimpajama_train.callbacks.base import Callback

if TYPE_CHECKING:
    from slimpajama_train.trainer import Trainer


def per_source_val(metrics: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(source, validation loss, target tokens) of each source evaluated at this step."""
    return [(k.split("/", 1)[1], v, int(metrics.get(f"val_tokens/{k.split('/', 1)[1]}", 0)))
            for k, v in sorted(metrics.items()) if k.startswith("val_loss/")]


class ConsoleCallback(Callback):
    name = "console"

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.cfg.trainer.max_steps, initial=trainer.step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.bar.update(metrics["step"] - self.bar.n)  # the step-0 evaluation does not advance the bar
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", refresh=False)
            parts = [f"step {metrics['step']:>6}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
                     f"gnorm {metrics['grad_norm']:.3f}"]
            if "tokens_per_s" in metrics:
                parts.append(f"tok/s {metrics['tokens_per_s']:.0f}")
            if "step_time_max_s" in metrics and trainer.dist.world_size > 1:
                # Host time per step on the fastest and slowest rank: a straggler (data, GC, Python) shows here.
                parts.append(f"rank time {metrics['step_time_min_s']:.3f}-{metrics['step_time_max_s']:.3f}s "
                             f"(slowest {metrics['slowest_rank']}, data wait max {metrics['data_wait_max_s']:.3f}s)")
            if "mfu" in metrics:
                parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
            if "val_loss" in metrics:
                parts.append(f"val_loss {metrics['val_loss']:.4f} ppl {metrics['val_ppl']:.1f}")
            self.bar.write(" | ".join(parts), file=sys.stderr)
        elif "val_loss" in metrics:
            self.bar.write(f"step {metrics['step']:>6} | "
                           f"val_loss {metrics['val_loss']:.4f} ppl {metrics['val_ppl']:.1f}", file=sys.stderr)
        per_source = per_source_val(metrics)
        if per_source:
            self.bar.write(f"step {metrics['step']:>6} | val_loss by source: " + ", ".join(
                f"{name} {loss:.4f} ({tokens / 1e3:.0f}k tok)" for name, loss, tokens in per_source), file=sys.stderr)

    def on_train_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if (bar := getattr(self, "bar", None)) is not None:
            bar.close()  # idempotent; on an error, so the message below it is not followed by a redrawn bar
