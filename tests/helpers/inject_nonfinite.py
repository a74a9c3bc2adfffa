"""Test helper, run under torchrun: train with the loss made NaN at the steps in $NAN_STEPS
(comma-separated, 1-based), through the real backward and optimizer-step path of the backend."""
import json
import os
import sys

from slimpajama_train.callbacks.build import build_callbacks
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.model import Transformer
from slimpajama_train.trainer import Trainer
from tests.helpers.trainer_cases import compose_train_config

bad_steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
cfg = compose_train_config(sys.argv[1:])
dist_info = init_distributed()
trainer = Trainer(cfg, dist_info, build_callbacks(cfg.logger, dist_info.is_main))


forward = Transformer.forward


def poisoned(self, tokens, targets=None, per_sample=False):
    """The training loss (the model computes it from targets), NaN at the chosen steps."""
    out = forward(self, tokens, targets, per_sample)
    bad = targets is not None and not per_sample and trainer.step + 1 in bad_steps
    return out * float("nan") if bad else out


Transformer.forward = poisoned  # FSDP2's and DeepSpeed's wrappers call the class's forward
try:
    summary = trainer.fit()
    if dist_info.is_main:
        print(json.dumps({"ok": True, "skipped_steps": trainer.skipped_steps, **summary}))
except RuntimeError as exc:
    if dist_info.is_main:
        print(json.dumps({"ok": False, "error": str(exc), "skipped_steps": trainer.skipped_steps}))
finally:
    destroy_distributed()
