"""Test helper: the real ``slimpajama_train.train`` entry point with one fault injected.

- FAULT=nan_loss: every training loss is NaN (evaluation is untouched), through the real backward
  and optimizer step, as a checkpoint with corrupt weights would give.
- FAULT=enospc:   the FSDP2 write of checkpoint step $FAULT_STEP writes part of a shard, then fails
  with ENOSPC (a full disk), on every rank.
"""
import errno
import os
from pathlib import Path

from slimpajama_train import train
from slimpajama_train.backends.fsdp2 import FSDP2Backend
from slimpajama_train.model import Transformer

fault = os.environ["FAULT"]

if fault == "nan_loss":
    forward = Transformer.forward

    def poisoned(self, tokens, targets=None, per_sample=False):
        out = forward(self, tokens, targets, per_sample)
        return out * float("nan") if targets is not None and not per_sample else out

    Transformer.forward = poisoned  # FSDP2's and DeepSpeed's wrappers call the class's forward
elif fault == "enospc":
    save = FSDP2Backend._save
    step_dir = f"step_{int(os.environ['FAULT_STEP']):08d}"

    def full_disk_save(self, path: Path) -> None:
        if step_dir not in str(path):
            return save(self, path)
        partial = path / f"__{self.dist.rank}_0.distcp"
        partial.write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

    FSDP2Backend._save = full_disk_save
else:
    raise SystemExit(f"FAULT={fault!r}: choose nan_loss or enospc")

train.main()
