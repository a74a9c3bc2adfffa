"""Load a trained model from a sharded checkpoint into one process (for generation and export)."""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from data_prep import storage
from slimpajama_train.checkpoint import LATEST, STATE, read_meta
from slimpajama_train.model import ModelConfig, Transformer
from slimpajama_train.safe_load import weights_only_loads


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a checkpoints root / run dir (then follow ``latest``). A URL
    (``s3://…``: a run or checkpoint copied to a bucket, or an export) is fetched whole into
    ``$TMPDIR/slimpajama_checkpoint_cache/`` first, once: a checkpoint never changes under its name."""
    if storage.is_remote(path):
        return fetch_remote(str(path))
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; give a checkpoint (…/checkpoints/step_XXXXXXXX), "
                                "its checkpoints/ folder or the run folder")
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    return p


def fetch_remote(url: str) -> Path:
    """The local copy of the checkpoint (following ``latest``) or export folder at ``url``."""
    url = storage.check_location(url, "checkpoint").rstrip("/")
    for root in (url, storage.join(url, "checkpoints")):
        pointer = storage.join(root, LATEST)
        if storage.exists(pointer):
            url = storage.join(root, storage.read_bytes(pointer).decode().strip())
            break
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir(), "slimpajama_checkpoint_cache", f"{key}-{url.rsplit('/', 1)[-1]}")
    return storage.fetch_tree(url, dest)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any], Path]:
    """Return (model in eval mode, checkpoint meta, checkpoint dir). DCP resharding lets any world size's
    checkpoint load here; tensors are read from DCP's files, nothing is unpickled into code."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model = Transformer(ModelConfig(**meta["config"]["model"]))
    if meta["config"]["backend"]["name"] == "deepspeed":
        from slimpajama_train.backends.deepspeed import consolidated_state_dict

        weights = consolidated_state_dict(ckpt / STATE)
        if model.cfg.tie_embeddings:
            weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])
        model.load_state_dict(weights)
    else:
        state = {"model": model.state_dict()}
        with warnings.catch_warnings(), weights_only_loads():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=str(ckpt / STATE))
        model.load_state_dict(state["model"])
    return model.to(device).eval(), meta, ckpt
