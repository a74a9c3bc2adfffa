"""``slimpajama-export``: write a checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

Usage::

    slimpajama-export runs/demo/checkpoints/step_00000200 exported/demo
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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimpajama_train.checkpoint_io import load_model
from slimpajama_train.hf_tokenizer import write_hf_tokenizer
from slimpajama_train.model import ModelConfig, Transformer


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


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to ``out_dir``."""
    import sentencepiece as spm

    model, _, ckpt = load_model(checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    special = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "pad_id": sp.pad_id()}
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(model.cfg, special), indent=2))
    generation_config = {"bos_token_id": special["bos_id"], "eos_token_id": special["eos_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # tokenizer.json mirrors the .model's normalizer, so transformers gives the ids training used (see hf_tokenizer).
    write_hf_tokenizer(ckpt / "tokenizer.model", tmp, model_max_length=model.cfg.max_seq_len)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a checkpoint to a Hugging Face LlamaForCausalLM folder.")
    p.add_argument("checkpoint", help="checkpoint dir (step_XXXXXXXX), its checkpoints/ root, or the run dir")
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    print(export_checkpoint(a.checkpoint, a.out_dir))


if __name__ == "__main__":
    main()
