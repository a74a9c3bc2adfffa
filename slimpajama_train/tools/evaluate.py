"""``slimpajama-eval``: score a checkpoint (perplexity on prepared shards, downstream tasks via lm-eval).

Usage::

    # perplexity on the holdout split, overall and per source
    slimpajama-eval runs/demo --data data/demo_shards --output runs/demo/eval.json
    # downstream tasks (the SlimPajama-DC set; needs network for the datasets)
    slimpajama-eval runs/demo --tasks arc_easy,arc_challenge,hellaswag,winogrande,truthfulqa_mc2 \\
        --batch-size 32 --device cuda --wandb online
    # local tasks written as lm-eval YAML, offline
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 slimpajama-eval runs/demo --tasks my_task --include-path tasks/

``CHECKPOINT`` is a checkpoint directory, its ``checkpoints/`` root or the run dir (then ``latest``),
or a ``slimpajama-export`` folder. The tokenizer is the run's SentencePiece ``tokenizer.model``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from tqdm import tqdm

from data_prep import storage
from data_prep.cli import add_debug_flag, cli_errors
from data_prep.shard_format import MANIFEST, load_manifest
from data_prep.tokenizer import file_sha256
from slimpajama_train.callbacks.wandb_logger import WANDB_ID_FILE
from slimpajama_train.data.dataset import DataConfig, TokenBlocks, local_file
from slimpajama_train.data.loader import to_device_batch
from slimpajama_train.model import ModelConfig, Transformer, lm_loss
from slimpajama_train.tools.load_checkpoint import load_model, resolve_checkpoint

TOKENIZER_FILE = "tokenizer.model"


# ---- loading ------------------------------------------------------------------------------------
def is_export(path: Path) -> bool:
    """A ``slimpajama-export`` folder: an HF Llama config next to safetensors weights."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_export(path: Path, device: str | torch.device = "cpu") -> Transformer:
    """Our Transformer from a ``slimpajama-export`` folder (the inverse of its prefix rename)."""
    from safetensors.torch import load_file

    hf = json.loads((path / "config.json").read_text())
    cfg = ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                      n_kv_heads=hf["num_key_value_heads"], vocab_size=hf["vocab_size"],
                      ffn_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                      norm_eps=hf["rms_norm_eps"],
                      rope_theta=hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 10000.0),
                      tie_embeddings=hf["tie_word_embeddings"])
    weights = {k.removeprefix("model."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    if cfg.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model = Transformer(cfg)
    model.load_state_dict(weights)
    return model.to(device).eval()


def load_for_eval(path: str | Path, device: str) -> tuple[Transformer, dict[str, Any], Path]:
    """(model in eval mode, checkpoint meta, the directory it came from). For an export the meta holds
    only ``tokenizer_sha256``, of the export's ``tokenizer.model`` (absent if the folder has none)."""
    p = resolve_checkpoint(path) if storage.is_remote(path) else Path(path)  # a URL: fetched (an export too)
    if is_export(p):
        tok = p / TOKENIZER_FILE
        return load_export(p, device), ({"tokenizer_sha256": file_sha256(tok)} if tok.is_file() else {}), p
    return load_model(resolve_checkpoint(p), device)


def model_tokenizer_sha256(model_dir: Path, meta: dict[str, Any], override: str | None) -> str:
    """The sha256 of the tokenizer the model was trained with: the checkpoint's record, the export's
    ``tokenizer.model``, else the ``--tokenizer`` file; raise when none says."""
    if meta.get("tokenizer_sha256"):
        return meta["tokenizer_sha256"]
    if override:
        return file_sha256(Path(override))
    raise ValueError(f"{model_dir}: no {TOKENIZER_FILE} and no recorded tokenizer checksum, so the shards' ids "
                     "cannot be checked against the model's; pass --tokenizer FILE (the tokenizer it was trained with)")


def load_tokenizer(model_dir: Path, meta: dict[str, Any], data_dir: str | None,
                   override: str | None) -> spm.SentencePieceProcessor:
    """The run's SentencePiece model: ``--tokenizer``, else the checkpoint's copy, else the data dir's.
    A checkpoint records the tokenizer's checksum; a different file is refused (its ids would mean
    other text)."""
    candidates = [Path(override)] if override else [model_dir / TOKENIZER_FILE]
    if not override and data_dir is not None:
        tok = load_manifest(data_dir)["tokenizer"]
        candidates.append(local_file(DataConfig(path=data_dir), data_dir, tok["file"], tok["sha256"]))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no tokenizer: looked for {', '.join(map(str, candidates))}; pass --tokenizer")
    expected = meta.get("tokenizer_sha256")
    if expected and file_sha256(path) != expected:
        raise ValueError(f"{path}: sha256 differs from the tokenizer the checkpoint was trained with "
                         f"({expected[:12]}…); pass the run's tokenizer.model with --tokenizer")
    return spm.SentencePieceProcessor(model_file=str(path))


# ---- perplexity ---------------------------------------------------------------------------------
class Progress:
    """Progress of a scoring loop, as the trainer shows it: a tqdm bar on a terminal; otherwise (a log
    file, a SLURM job) one line every ``every`` batches and at the end."""

    def __init__(self, desc: str, total: int, stream: Any = None, lines: int = 10) -> None:
        self.desc, self.total, self.stream = desc, total, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // lines)
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="batch", file=self.stream, dynamic_ncols=True,
                        mininterval=1.0) if self.tty else None

    def update(self, done: int, samples: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif done % self.every == 0 or done == self.total:
            rate = samples / max(time.perf_counter() - self.t0, 1e-9)
            print(f"{self.desc}: {done}/{self.total} batches, {samples} samples, loss {loss:.4f}, "
                  f"{rate:.1f} samples/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def shard_perplexity(model: Transformer, data_dir: str | Path, split: str = "val", batch_size: int = 16,
                     max_batches: int | None = None, seed: int = DataConfig.seed,
                     tokenizer_sha256: str | None = None, progress_stream: Any = None,
                     cache_dir: str | None = None) -> dict[str, Any]:
    """Mean next-token loss and perplexity over a split of prepared shards, overall and per source
    (where a shard holds one source, as prep writes validation shards), with the tokens behind each.

    The loss is the trainer's (``lm_loss(..., per_sample=True)``), so ``loss`` matches its ``val_loss``
    on the same samples. Samples are read in the split's seeded shuffled order, so ``max_batches``
    draws from every source, not from the first shard only. Progress goes to ``progress_stream``
    (stderr by default; see :class:`Progress`). ``data_dir`` may be a URL: its shards are read
    through the shard cache in ``cache_dir`` (default as ``data.cache_dir``'s).
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"--max-batches={max_batches}: must be >= 1 (omit it to score the whole split)")
    data_dir = str(data_dir)
    manifest = load_manifest(data_dir)
    theirs = manifest["tokenizer"]["sha256"]
    if tokenizer_sha256 and theirs != tokenizer_sha256:
        raise ValueError(f"{data_dir}/{MANIFEST}: shards were tokenized with tokenizer sha256 {theirs[:12]}…, the "
                         f"model with {tokenizer_sha256[:12]}…; score shards prepared with the model's tokenizer")
    if manifest["seq_len"] > model.cfg.max_seq_len:
        raise ValueError(f"{data_dir}: samples of {manifest['seq_len']} tokens exceed model.max_seq_len="
                         f"{model.cfg.max_seq_len}")
    ds = TokenBlocks(data_dir, manifest, split, seed, shuffle=True, with_source=True,
                     cache=DataConfig(path=data_dir, cache_dir=cache_dir).cache_spec())
    n = len(ds) if max_batches is None else min(len(ds), max_batches * batch_size)
    device = next(model.parameters()).device
    k = len(ds.sources)
    loss_sum, count = torch.zeros(k + 1, dtype=torch.float64), torch.zeros(k + 1, dtype=torch.float64)
    progress = Progress(f"perplexity {split}", -(-n // batch_size), progress_stream)
    try:
        for b, start in enumerate(range(0, n, batch_size), 1):
            items = [ds[i] for i in range(start, min(n, start + batch_size))]
            blocks = torch.stack([t for t, _ in items])  # (B, T+1)
            src = torch.tensor([s for _, s in items])
            slot = torch.where(src >= 0, src, k)  # the last slot: samples of mixed-source shards
            inputs, targets = to_device_batch(blocks, device)  # stored dtype -> int64 on the device
            losses = lm_loss(model(inputs), targets, per_sample=True).double().cpu()  # (B,)
            loss_sum.index_add_(0, slot, losses)
            count.index_add_(0, slot, torch.ones_like(losses))
            progress.update(b, start + len(items), float(loss_sum.sum() / count.sum()))
    finally:
        progress.close()
        ds.close()
    tokens_per_sample = int(manifest["seq_len"])
    total = float(loss_sum.sum() / count.sum())
    out: dict[str, Any] = {"data": str(data_dir), "split": split, "samples": n, "tokens": n * tokens_per_sample,
                           "loss": total, "ppl": math.exp(min(total, 50.0)), "per_source": {}}
    for j, name in enumerate(ds.sources):
        if count[j]:
            loss = float(loss_sum[j] / count[j])
            out["per_source"][name] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                                       "tokens": int(count[j]) * tokens_per_sample, "samples": int(count[j])}
    if count[k]:
        out["mixed_source_samples"] = int(count[k])  # in the totals, but in no per-source figure
    return out


# ---- lm-eval ------------------------------------------------------------------------------------
def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's task index. Indexing its ~15k built-in tasks takes seconds, so when every requested
    task is in ``include_path`` only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def run_lm_eval(model: Transformer, tokenizer: spm.SentencePieceProcessor, tasks: list[str],
                include_path: str | None = None, batch_size: int = 16, limit: float | None = None,
                num_fewshot: int | None = None, device: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """Run lm-eval tasks on our model; return the JSON-ready part of ``simple_evaluate``'s results.
    ``seed`` None keeps lm-eval's default seeds (few-shot examples as in published numbers)."""
    try:
        import lm_eval
    except ImportError as exc:  # an optional dependency: perplexity alone does not need it
        raise SystemExit("--tasks needs lm-evaluation-harness: pip install 'slimpajama-pipeline[eval]' "
                         "(or 'lm-eval>=0.4')") from exc
    from lm_eval.utils import handle_non_serializable

    from slimpajama_train.tools.lm_eval_adapter import SlimPajamaLM

    lm = SlimPajamaLM(model, tokenizer, batch_size=batch_size, device=device)
    seeds = {} if seed is None else {k: seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                        "fewshot_random_seed")}
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress; our stdout is the results JSON
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(tasks, include_path),
                                      num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
                                      log_samples=False, **seeds)
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    # A round trip through JSON turns numpy scalars and the like into plain values now, not at write time.
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=handle_non_serializable))


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``eval/...`` scalars for W&B, named by the split scored: ``eval/val_ppl``, ``eval/val_ppl/<source>``
    (``eval/train_ppl``... for ``--split train``), and ``eval/<task>/<metric>``."""
    out: dict[str, float] = {}
    ppl = results.get("perplexity")
    if ppl:
        sp = ppl["split"]
        out.update({f"eval/{sp}_loss": ppl["loss"], f"eval/{sp}_ppl": ppl["ppl"], f"eval/{sp}_tokens": ppl["tokens"]})
        for name, s in ppl["per_source"].items():
            out.update({f"eval/{sp}_loss/{name}": s["loss"], f"eval/{sp}_ppl/{name}": s["ppl"],
                        f"eval/{sp}_tokens/{name}": s["tokens"]})
    lm = results.get("lm_eval") or {}
    for task, metrics in {**lm.get("results", {}), **lm.get("groups", {})}.items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metrics are "<metric>,<filter>"; "alias" etc. are not
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = value
    return out


# ---- W&B ----------------------------------------------------------------------------------------
def run_dir_of(meta: dict[str, Any], model_dir: Path) -> Path | None:
    """The training run's directory: the one above ``checkpoints/``, else the config's ``run_dir``."""
    candidates = [model_dir.parent.parent] if model_dir.parent.name == "checkpoints" else []
    if meta.get("config", {}).get("run_dir"):
        candidates.append(Path(meta["config"]["run_dir"]))
    return next((d for d in candidates if d.is_dir()), None)


def training_run_id(meta: dict[str, Any], model_dir: Path) -> str | None:
    """The W&B run id of the run that produced the checkpoint: the wandb callback's checkpointed
    state, else ``<run_dir>/wandb_run_id``."""
    rid = meta.get("callbacks", {}).get("wandb", {}).get("run_id")
    if rid:
        return rid
    run_dir = run_dir_of(meta, model_dir)
    if run_dir is not None and (run_dir / WANDB_ID_FILE).is_file():
        return (run_dir / WANDB_ID_FILE).read_text().strip()
    return None


def log_wandb(metrics: dict[str, float], results: dict[str, Any], mode: str, project: str | None,
              run_id: str | None, wandb_dir: Path, entity: str | None = None) -> str:
    """Write ``metrics`` as the summary of run ``run_id`` (resumed) or of a new ``eval`` run; return its id."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, entity=entity, id=run_id, resume="allow" if run_id else None, mode=mode,
                     dir=str(wandb_dir), job_type="eval", config=None if run_id else {"eval": results["args"]})
    try:
        for k, v in metrics.items():
            run.summary[k] = v
        run.summary["eval/checkpoint"] = results["checkpoint"]
        if results.get("step") is not None:
            run.summary["eval/step"] = results["step"]
        return run.id
    finally:
        run.finish()


# ---- CLI ----------------------------------------------------------------------------------------
def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic: a reader never sees half a file (tmp in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Score a slimpajama_train checkpoint: shard perplexity and lm-eval tasks.")
    p.add_argument("checkpoint", help="checkpoint dir, its checkpoints/ root, the run dir (latest), or an export")
    p.add_argument("--data", help="prepared shard dir (manifest.json) for perplexity: a path or a URL (s3://…)")
    p.add_argument("--cache-dir", help="node-local folder for shards fetched from a URL --data (default: "
                                       "$TMPDIR/slimpajama_shard_cache)")
    p.add_argument("--split", default="val", help="split of --data to score (default: val)")
    p.add_argument("--max-batches", type=int, help="perplexity over at most this many batches (default: all)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks or groups, e.g. arc_easy,hellaswag")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    p.add_argument("--limit", type=float, help="lm-eval: at most this many documents per task (<1: a fraction)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's tokenizer.model)")
    p.add_argument("--seed", type=int, help="all of lm-eval's seeds (default: lm-eval's own)")
    p.add_argument("--output", help="write the results here as JSON (atomically)")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="off")
    p.add_argument("--wandb-project", help="default: the training run's logger.wandb.project")
    p.add_argument("--wandb-run-id", help="run to attach the summary to (default: the training run's, if known)")
    p.add_argument("--wandb-new-run", action="store_true", help="log to a new eval run, not the training run")
    p.add_argument("--wandb-dir", help="where W&B writes (default: the run dir, else the output's folder)")
    add_debug_flag(p)
    a = p.parse_args(argv)
    if not a.data and not a.tasks:
        p.error("nothing to do: give --data (perplexity) and/or --tasks (lm-eval)")
    if a.batch_size < 1:
        p.error(f"--batch-size={a.batch_size}: must be >= 1")
    if a.max_batches is not None and a.max_batches < 1:
        p.error(f"--max-batches={a.max_batches}: must be >= 1 (omit it to score the whole split)")
    if a.limit is not None and a.limit >= 1:
        a.limit = int(a.limit)  # lm-eval reads a float below 1 as a fraction, anything else as a count
    return a


def evaluate(a: argparse.Namespace) -> dict[str, Any]:
    """Load the model once, run what ``a`` asks for; return the results (also written/logged)."""
    model, meta, model_dir = load_for_eval(a.checkpoint, a.device)
    results: dict[str, Any] = {"checkpoint": str(model_dir), "step": meta.get("step"),
                               "tokens_seen": meta.get("tokens_seen"), "args": vars(a)}
    if a.data:
        seed = meta.get("config", {}).get("data", {}).get("seed", DataConfig.seed)
        results["perplexity"] = shard_perplexity(model, a.data, a.split, a.batch_size, a.max_batches, seed,
                                                 model_tokenizer_sha256(model_dir, meta, a.tokenizer),
                                                 cache_dir=a.cache_dir)
    if a.tasks:
        sp = load_tokenizer(model_dir, meta, a.data, a.tokenizer)
        tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
        results["lm_eval"] = run_lm_eval(model, sp, tasks, a.include_path, a.batch_size, a.limit, a.num_fewshot,
                                         a.device, a.seed)
    results["metrics"] = flat_metrics(results)
    if a.wandb != "off":
        run_id = None if a.wandb_new_run else (a.wandb_run_id or training_run_id(meta, model_dir))
        wcfg = meta.get("config", {}).get("logger", {}).get("wandb", {})
        run_dir = run_dir_of(meta, model_dir)
        wandb_dir = Path(a.wandb_dir or run_dir or (Path(a.output).parent if a.output else "."))
        # The training run's project and entity: a resumed id elsewhere would be another run.
        results["wandb_run_id"] = log_wandb(results["metrics"], results, a.wandb,
                                            a.wandb_project or wcfg.get("project") or "slimpajama", run_id, wandb_dir,
                                            wcfg.get("entity"))
    if a.output:
        write_json(Path(a.output), results)
    return results


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    with cli_errors("slimpajama-eval", a.debug):
        results = evaluate(a)
    json.dump(results["metrics"], sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
