"""Start-up checks that this machine can run the configured backend, precision and compile option.

Each probe returns None when the path can run, or a sentence naming what is missing; the checks turn
them into one ValueError that also names the fix, before the model or the DeepSpeed engine is built
(instead of a library traceback minutes later). Tests use the same probes to skip with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from slimpajama_train.backends.base import BackendConfig


def cpu_fp16_problem() -> str | None:
    """DeepSpeed's CPU accelerator supports fp16 only where oneDNN has fp16 kernels (AVX-512 FP16 or
    AMX-FP16): ``deepspeed/accelerator/cpu_accelerator.py`` ``is_fp16_supported``. Its bf16 answer
    is always yes (torch emulates bf16 where the CPU lacks AVX512_BF16), so bf16 needs no probe."""
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception as exc:  # noqa: BLE001 - an old or oneDNN-less torch: DeepSpeed says no too
        return f"this torch cannot tell whether oneDNN has fp16 kernels ({exc})"
    if ok:
        return None
    return ("this CPU lacks the fp16 instructions oneDNN needs, AVX-512 FP16 or AMX-FP16 on x86: "
            "torch.ops.mkldnn._is_mkldnn_fp16_supported() is False")


def cuda_precision_problem(precision: str, device: torch.device) -> str | None:
    """DeepSpeed's CUDA accelerator rules: fp16 needs compute capability >= 7 (6.x only with
    DS_ALLOW_DEPRECATED_FP16=1), bf16 needs ``torch.cuda.is_bf16_supported()``."""
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if precision == "fp16" and major < 7 and not (major == 6 and os.environ.get("DS_ALLOW_DEPRECATED_FP16") == "1"):
        return f"GPU {name!r} has compute capability {major}.{minor}; DeepSpeed needs >= 7.0 for fp16"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"GPU {name!r} (compute capability {major}.{minor}) does not support bf16"
    return None


def deepspeed_precision_problem(precision: str, device: torch.device) -> str | None:
    """Why DeepSpeed would refuse ``precision`` on ``device`` ("Type fp16 is not supported on your
    device."), or None."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        return cpu_fp16_problem() if precision == "fp16" else None
    if device.type == "cuda":
        return cuda_precision_problem(precision, device)
    return None


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder (and so DeepSpeed's JIT ops) would use."""
    return shutil.which(os.environ.get("CXX", "c++"))


def deepspeed_op_problem(op_name: str) -> str | None:
    """Why DeepSpeed could not load op ``op_name`` (e.g. ``cpu_adam``): it is neither installed
    prebuilt (DS_BUILD_*=1) nor JIT-buildable here (needs ninja and a C++ compiler)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as backends/deepspeed.py: before deepspeed is imported
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(op_name, False):
        return None
    from torch.utils.cpp_extension import is_ninja_available

    missing = [what for what, ok in (("ninja", is_ninja_available()),
                                     (f"a C++ compiler ({os.environ.get('CXX', 'c++')}, or $CXX)", cxx_compiler()))
               if not ok]
    if not missing:
        return None
    return (f"DeepSpeed's {op_name} op is not prebuilt and building it needs {' and '.join(missing)}, "
            "which this machine lacks")


def check_backend_hardware(cfg: BackendConfig, device: torch.device) -> None:
    """Raise ValueError if this machine cannot run ``cfg`` on ``device``: DeepSpeed refuses the
    precision (fp16 on a CPU without AVX-512 FP16, or on a pre-Volta GPU; bf16 on a GPU without
    it), or ZeRO-Offload's CPU Adam can be neither loaded nor built. FSDP2 computes in half precision
    through torch itself, which runs fp16 and bf16 on any CPU (emulated where the ISA lacks them)."""
    if cfg.name != "deepspeed":
        return
    offload = "_offload" if cfg.offload_optimizer and cfg.offload_params else ""
    backend = f"backend=zero{cfg.zero_stage}{offload}"
    reason = deepspeed_precision_problem(cfg.precision, device)
    if reason is not None:
        others = [p for p in ("bf16", "fp32") if p != cfg.precision and deepspeed_precision_problem(p, device) is None]
        raise ValueError(
            f"{backend} with backend.precision={cfg.precision} needs {cfg.precision} support in DeepSpeed's "
            f"{device.type.upper()} accelerator ({reason}); use backend.precision={' or '.join(others) or 'fp32'}, "
            "or backend=fsdp2"
        )
    if cfg.offload_optimizer:
        reason = deepspeed_op_problem("cpu_adam")
        if reason is not None:
            raise ValueError(f"{backend} (backend.offload_optimizer=true) runs DeepSpeed's CPU Adam: {reason}; install "
                             "ninja and g++ (or set CXX), or use backend.offload_optimizer=false")


def compile_problem(device: torch.device) -> str | None:
    """Why ``trainer.compile=true`` cannot work here, or None. TorchInductor compiles C++ kernels on
    CPU with the compiler in ``torch._inductor.config.cpp.cxx`` ($CXX, else g++; clang++ on macOS),
    and Triton kernels on GPU, whose launcher Triton builds with a C compiler ($CC, else gcc/clang)."""
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        candidates = [c for c in inductor_config.cpp.cxx if c] if isinstance(inductor_config.cpp.cxx, (list, tuple)) \
            else [inductor_config.cpp.cxx]
        if any(shutil.which(c) for c in candidates):
            return None
        return (f"trainer.compile=true on CPU needs a C++ compiler for TorchInductor (looked for "
                f"{' or '.join(candidates)} on PATH: not found); install one (e.g. g++) or set CXX, "
                "or set trainer.compile=false")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "trainer.compile=true on GPU needs triton (pip install triton), or set trainer.compile=false"
        candidates = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang", "cc"]
        if any(shutil.which(c) for c in candidates):
            return None
        return (f"trainer.compile=true on GPU needs a C compiler for Triton's kernel launcher (looked for "
                f"{' or '.join(candidates)} on PATH: not found); install gcc or set CC, or set trainer.compile=false")
    return None
