"""Training backends behind one interface (see :class:`~slimpajama_train.backends.base.Backend`)."""
from __future__ import annotations

from slimpajama_train.backends.base import Backend, BackendConfig
from slimpajama_train.backends.hardware import check_backend_hardware
from slimpajama_train.distributed import DistInfo


def build_backend(cfg: BackendConfig, dist_info: DistInfo) -> Backend:
    """Instantiate the backend named by ``backend.name`` (imports only that backend's library), after
    checking that this machine can run it (:func:`~slimpajama_train.backends.hardware.check_backend_hardware`)."""
    check_backend_hardware(cfg, dist_info.device)
    if cfg.name == "fsdp2":
        from slimpajama_train.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(cfg, dist_info)
    if cfg.name == "deepspeed":
        from slimpajama_train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, dist_info)
    raise ValueError(f"backend.name={cfg.name!r}: available backends are fsdp2 and deepspeed")
