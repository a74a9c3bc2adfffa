"""``slimpajama-export``: write a checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

Usage::

    slimpajama-export runs/demo/checkpoints/step_00000200 exported/demo
    slimpajama-export runs/demo exported/demo --force   # replace a previous export's files there
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported/demo')"

Our parameter names and RoPE layout already follow HF Llama, so export is a prefix rename; tied
embeddings are stored once, as HF expects. ``AutoTokenizer`` on the folder gives the ids training used,
``sp.encode(text)``; ``add_special_tokens=True`` adds nothing, because training never put a BOS before a document
(``hf_tokenizer`` has the details).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from data_prep.cli import add_debug_flag, cli_errors
from slimpajama_train.model import ModelConfig, Transformer
from slimpajama_train.tools.hf_tokenizer import write_hf_tokenizer
from slimpajama_train.tools.load_checkpoint import load_model, resolve_checkpoint


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse model options that ``LlamaForCausalLM`` cannot express."""
    problems = []
    if cfg.position_encoding != "rope":
        problems.append(f"model.position_encoding={cfg.position_encoding} (HF Llama has RoPE only)")
    if cfg.share_layers_every != 1:
        problems.append(f"model.share_layers_every={cfg.share_layers_every} (HF Llama has no shared layers)")
    if cfg.embedding_rank is not None:
        problems.append(f"model.embedding_rank={cfg.embedding_rank} (HF Llama has no factorized embeddings)")
    if problems:
        raise ValueError("cannot export to LlamaForCausalLM: " + "; ".join(problems))


def hf_config(cfg: ModelConfig, special: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` of the equivalent ``LlamaForCausalLM``."""
    check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": special["bos_id"],
        "eos_token_id": special["eos_id"],
        "torch_dtype": "float32",
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.cfg.tie_embeddings:
                continue  # HF re-ties it to model.embed_tokens.weight on load
            out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, fine for a CLI)
    os.umask(mask)
    return mask


def check_output_dir(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an output folder that holds anything unless ``force``; and, always, the run folder of the
    checkpoint (the export's config.json would replace the run's) and any folder inside its
    checkpoints/ (pruned with old checkpoints) or inside the checkpoint itself."""
    out_r, ckpt_r = out.resolve(), checkpoint.resolve()
    in_run = ckpt_r.parent.name == "checkpoints"
    if (in_run and out_r == ckpt_r.parent.parent) or out_r.is_relative_to(ckpt_r.parent if in_run else ckpt_r):
        raise ValueError(f"{out}: is the run folder or inside the checkpoints of {checkpoint}; export to a "
                         "folder of its own, e.g. exported/<run name> or <run dir>/hf")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: not empty; export to a new or empty folder, or pass --force to replace "
                              "the export's files there (config.json, model.safetensors, tokenizer files; "
                              "nothing else is touched)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another output folder")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to ``out_dir``.

    Nothing is deleted. A folder that holds anything is refused unless ``force``, which replaces only
    the files an export writes. Each file is written under a temporary name in ``out_dir`` and
    renamed into place, with the mode the user's umask gives (0644 under umask 022).
    """
    import sentencepiece as spm

    out = Path(out_dir)
    ckpt_path = resolve_checkpoint(checkpoint)
    check_output_dir(out, ckpt_path, force)
    model, _, ckpt = load_model(ckpt_path)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    special = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id()}
    out.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~current_umask()
    # Staged in a hidden folder inside out_dir (same filesystem: each rename is atomic), then each file
    # is renamed over its name; a crash leaves only the staging folder, never a half-written file.
    staged = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        (staged / "config.json").write_text(json.dumps(hf_config(model.cfg, special), indent=2))
        generation_config = {"bos_token_id": special["bos_id"], "eos_token_id": special["eos_id"]}
        (staged / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        save_file(hf_state_dict(model), str(staged / "model.safetensors"), metadata={"format": "pt"})
        # tokenizer.json mirrors the .model's normalizer: transformers gives the ids training used (see hf_tokenizer).
        write_hf_tokenizer(ckpt / "tokenizer.model", staged, model_max_length=model.cfg.max_seq_len)
        for name in sorted(p.name for p in staged.iterdir()):
            os.chmod(staged / name, mode)  # safetensors writes 0600 whatever the umask
            os.replace(staged / name, out / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # empty unless a write failed
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face LlamaForCausalLM folder.")
    p.add_argument("checkpoint", help="checkpoint dir (step_XXXXXXXX), its checkpoints/ root, or the run dir")
    p.add_argument("out_dir", help="a new or empty folder (see --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that holds other files, replacing only the export's own files")
    add_debug_flag(p)
    a = p.parse_args(argv)
    with cli_errors("slimpajama-export", a.debug):
        print(export_checkpoint(a.checkpoint, a.out_dir, force=a.force))


if __name__ == "__main__":
    main()
