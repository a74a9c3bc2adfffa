"""Test helper, run under torchrun with Hydra overrides (and MALLOC_MMAP_THRESHOLD_ set, so that
freed tensors leave the resident set at once): train through the real Trainer and record this
rank's resident memory after every micro-batch's backward, relative to the start of its step.
Writes $ACCUM_OUT.rank<r>: the largest growth seen after a micro-batch that is not the step's last
(what gradient accumulation holds), and the bytes an unsharded fp32 gradient of the model takes."""
import json
import os
import sys
from pathlib import Path

import psutil
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_prep.config import conf_dir
from slimpajama_train.config import register_configs
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.trainer import Trainer

register_configs()
with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
    cfg = OmegaConf.to_object(compose(config_name="train", overrides=sys.argv[1:]))
dist_info = init_distributed(cfg.dist)
trainer = Trainer(cfg, dist_info, callbacks=[])
me = psutil.Process()
growth: list[int] = []
state = {"start": 0, "micro": 0}
forward_backward = trainer.backend.forward_backward


def measured(batch, last_micro):
    if state["micro"] == 0:
        state["start"] = me.memory_info().rss
    loss = forward_backward(batch, last_micro)
    state["micro"] = 0 if last_micro else state["micro"] + 1
    if not last_micro and trainer.step >= 1:  # step 1 allocates the optimizer state
        growth.append(me.memory_info().rss - state["start"])
    return loss


trainer.backend.forward_backward = measured
trainer.fit()
unsharded = (sum(p.numel() * 4 for p in trainer.backend.model.parameters())
             * (dist_info.world_size if trainer.backend.sharded else 1))
Path(f"{os.environ['ACCUM_OUT']}.rank{dist_info.rank}").write_text(json.dumps(
    {"max_growth_bytes": max(growth), "unsharded_grad_bytes": unsharded, "grad_accum": trainer.grad_accum}))
trainer.close()
destroy_distributed(barrier=True)  # no rank leaves while a peer still finishes a collective
