"""Test helper, run under torchrun with Hydra overrides: build the model the way the trainer does
(``Backend.build_model``: sharded, initialized, no optimizer yet) and report, per rank, the peak host
RSS so far, the full fp32 model size, and with $INIT_COMPARE=1 whether every parameter equals a
plain single-process ``Transformer(cfg, seed)`` build. Writes one JSON file per rank: $INIT_OUT.rank<r>."""
import json
import os
import sys
from pathlib import Path

import torch

from slimpajama_train.backends import build_backend
from slimpajama_train.config import resolve_config
from slimpajama_train.data.dataset import open_dataset
from slimpajama_train.distributed import destroy_distributed, init_distributed
from slimpajama_train.mfu import host_peak_rss_bytes
from slimpajama_train.model import Transformer
from slimpajama_train.trainer import build_model
from tests.helpers.trainer_cases import compose_train_config

cfg = compose_train_config(sys.argv[1:])
dist_info = init_distributed(cfg.dist)
manifest, _ = open_dataset(cfg.data)
cfg = resolve_config(cfg, manifest, dist_info.world_size)
with torch.device("meta"):
    full_bytes = sum(p.numel() * 4 for p in Transformer(cfg.model, seed=None).parameters())
rss_before = host_peak_rss_bytes()
backend = build_backend(cfg.backend, dist_info)
G, B = cfg.trainer.global_batch_size, cfg.data.micro_batch_size
backend.build_model(lambda: build_model(cfg), cfg.seed, cfg.optim, B, G // (B * dist_info.world_size))
report = {"rank": dist_info.rank, "peak_rss_bytes": host_peak_rss_bytes(), "rss_before_build_bytes": rss_before,
          "full_fp32_model_bytes": full_bytes}

if os.environ.get("INIT_COMPARE") == "1":
    reference = dict(Transformer(cfg.model, seed=cfg.seed).named_parameters())
    mismatched = []
    for name, p in backend.model.named_parameters():
        if cfg.backend.name == "deepspeed" and cfg.backend.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        else:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if not torch.equal(full.float().cpu(), reference[name].detach().to(full.dtype).float()):
            mismatched.append(name)
    report.update(compared=len(reference), mismatched=mismatched)
Path(f"{os.environ['INIT_OUT']}.rank{dist_info.rank}").write_text(json.dumps(report))
backend.close() if cfg.backend.name != "deepspeed" else None  # no DeepSpeed engine was built here
destroy_distributed(barrier=True)  # no rank leaves while a peer still finishes a collective
if cfg.backend.name == "deepspeed":
    # zero.Init without a DeepSpeed engine (this helper stops before the optimizer) leaves a native
    # thread that now and then aborts the interpreter's exit ("terminate called without an active
    # exception"); the trainer always builds the engine and destroys it. The report is written.
    os._exit(0)
