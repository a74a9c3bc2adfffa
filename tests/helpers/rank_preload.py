"""Imported once by the fork server of :mod:`tests.helpers.launch`; every fork-launched rank starts
with these modules loaded. Third-party only: a rank imports the project's modules itself, as under
torchrun (and the fast suite's import recorder sees which ones it used).

Nothing here may start a thread (a fork copies only the forking thread; a lock another thread held
would stay locked in every rank), and nothing may be left in an output buffer (every rank would
write it again)."""
import gc
import os
import sys

import deepspeed  # noqa: F401
import deepspeed.runtime.engine  # noqa: F401
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (compiles at import: TorchInductor)
import hydra  # noqa: F401
import hydra._internal.core_plugins.basic_launcher  # noqa: F401
import hydra._internal.hydra  # noqa: F401
import omegaconf  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401  (imported on the first call of many torch functions)
import torch._inductor.compile_fx  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor  # noqa: F401

_threads = os.listdir("/proc/self/task")  # native threads too (OpenMP, torch's pools)
if len(_threads) != 1:
    raise RuntimeError(f"importing the rank preload started {len(_threads) - 1} thread(s)")
sys.stdout.flush()
sys.stderr.flush()
# What the imports built lives as long as any rank: out of the collector's view (the fork-server use
# gc.freeze is made for), so a rank's full collections (the trainer's before its loop, DeepSpeed's
# defragment) scan what the rank built, not all of torch and DeepSpeed: 0.7 s less CPU per rank.
gc.collect()
gc.freeze()
