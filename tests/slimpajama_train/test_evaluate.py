"""slimpajama-eval: shard perplexity per source, lm-eval tasks on our model, offline JSON and W&B.

One tiny model is trained once for the module (300 steps on the demo shards, ~10-20 s on 2 CPU
cores). The lm-eval tasks are written here, as YAML over JSON-lines files, from the demo corpus's
held-out text, so nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from data_prep.shard_format import load_manifest
from slimpajama_train.data.dataset import TokenBlocks, shard_sources
from slimpajama_train.model import Transformer, lm_loss
from slimpajama_train.tools.evaluate import load_for_eval, main, run_lm_eval, shard_perplexity
from slimpajama_train.tools.lm_eval_adapter import SlimPajamaLM
from tests.conftest import REPO, read_metrics, tiny_train_overrides
from tests.helpers.built_once import built_once
from tests.helpers.launch import run_ranks

STEPS = 300  # calibrated: MC accuracy 0.81 after 200 steps, 0.92 after 300 (untrained: 0.44)
TRAINED_MIN_ACC, UNTRAINED_MAX_ACC = 0.75, 0.6  # two choices: chance is 0.5
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module", autouse=True)
def offline_single_thread(tmp_path_factory):
    """No hub access and no writes to ~/.cache for the whole module (also for in-process lm-eval).
    One torch thread: with the cores shared, two threads made this tiny model's forward ~18x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**OFFLINE_ENV, "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}.items():
            mp.setenv(k, v)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "eval_run", lambda run_dir: run_ranks(
        1, tiny_train_overrides(demo_shards, run_dir, "trainer.eval_interval=100", f"checkpoint.interval={STEPS}",
                                steps=STEPS), cwd=REPO))


@pytest.fixture(scope="module")
def trained(trained_run) -> tuple[Transformer, spm.SentencePieceProcessor]:
    model, _, ckpt = load_for_eval(trained_run, "cpu")
    return model, spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))


# ---- local tasks from held-out demo text --------------------------------------------------------
def heldout_texts(shards: Path) -> list[str]:
    """The validation split's documents (prep held them out of training), decoded from the shards:
    the token stream is split on EOS, which prep writes between documents."""
    manifest = load_manifest(shards)
    sp = spm.SentencePieceProcessor(model_file=str(shards / manifest["tokenizer"]["file"]))
    ds = TokenBlocks(shards, manifest, "val", seed=0, shuffle=False)
    ids = [t for i in range(len(ds)) for t in ds[i].tolist()]
    ds.close()
    docs: list[list[int]] = [[]]
    for t in ids:
        docs.append([]) if t == sp.eos_id() else docs[-1].append(t)
    return [sp.decode(d) for d in docs if d]


def _task_yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


def write_demo_tasks(shards: Path, out: Path, ctx_words: int = 8, cont_words: int = 12, seed: int = 0) -> dict:
    """Three lm-eval tasks over held-out text, one per request type our adapter serves:

    - ``demo_order_mc`` (multiple_choice): after ``ctx_words`` words, the true next ``cont_words``
      words or the same words shuffled. Both choices have the same words, so only a model that
      learned word order beats chance (0.5); the gold position is random, so ties cannot help.
    - ``demo_lastword`` (loglikelihood): the last word of such a window, lambada-style.
    - ``demo_rolling`` (loglikelihood_rolling): longer passages, scored in max_seq_len windows.
    Items are kept where context and continuation fit in 60 tokens (the model's window is 64).
    """
    rng = random.Random(seed)
    sp = spm.SentencePieceProcessor(model_file=str(shards / load_manifest(shards)["tokenizer"]["file"]))
    mc, lastword, rolling = [], [], []
    for words in (t.split() for t in heldout_texts(shards)):
        step = ctx_words + cont_words
        for i in range(0, len(words) - step, step):
            ctx, cont = words[i:i + ctx_words], words[i + ctx_words:i + step]
            shuffled = cont[:]
            while shuffled == cont and len(set(cont)) > 1:
                rng.shuffle(shuffled)
            if shuffled == cont or len(sp.encode(" ".join(ctx + cont))) > 60:
                continue
            label = rng.randrange(2)
            choices = [" ".join(cont), " ".join(shuffled)][::1 if label == 0 else -1]
            mc.append({"context": " ".join(ctx), "choices": choices, "label": label})
            lastword.append({"context": " ".join(ctx + cont[:-1]), "target": " " + cont[-1]})
        rolling += [{"text": " ".join(words[i:i + 60])} for i in range(0, len(words) - 60, 240)]
    out.mkdir(parents=True, exist_ok=True)
    bodies = {
        "demo_order_mc": ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                          "doc_to_target: label\nmetric_list:\n  - metric: acc\n"),
        "demo_lastword": ('output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                          'target_delimiter: ""\nmetric_list:\n  - metric: perplexity\n    aggregation: perplexity\n'
                          "    higher_is_better: false\n  - metric: acc\n"),
        "demo_rolling": ('output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                         "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
    }
    rows = {"demo_order_mc": mc[:150], "demo_lastword": lastword[:40], "demo_rolling": rolling[:16]}
    for name, items in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        (out / f"{name}.yaml").write_text(_task_yaml(name, out / f"{name}.jsonl", out / "hf_cache", bodies[name]))
    return {k: len(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def demo_tasks(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_tasks")
    counts = write_demo_tasks(demo_shards, out)
    assert counts["demo_order_mc"] >= 60 and counts["demo_lastword"] >= 20 and counts["demo_rolling"] >= 5, counts
    return out


# ---- perplexity ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_perplexity_per_source_matches_trainer(trained_run, demo_shards, tmp_path):
    out = tmp_path / "ppl.json"
    main([str(trained_run), "--data", str(demo_shards), "--batch-size", "16", "--output", str(out)])
    res = json.loads(out.read_text())
    ppl = res["perplexity"]
    manifest = load_manifest(demo_shards)
    sources, per_shard = shard_sources(manifest["splits"]["val"]["shards"])
    assert (per_shard >= 0).all() and len(sources) >= 2  # prep writes single-source validation shards
    assert sorted(ppl["per_source"]) == sources
    assert ppl["samples"] == manifest["splits"]["val"]["samples"]
    assert sum(s["tokens"] for s in ppl["per_source"].values()) == ppl["tokens"] == ppl["samples"] * 64
    for s in ppl["per_source"].values():
        assert math.isclose(s["ppl"], math.exp(s["loss"]))
    assert res["step"] == STEPS and res["metrics"]["eval/val_ppl"] == ppl["ppl"]

    # The trainer's own validation at the last step: its first global batch (8 samples, in the
    # split's seeded order) scored with the same per-sample loss. One batch of 8 here is the same.
    model, meta, _ = load_for_eval(trained_run, "cpu")
    ours = shard_perplexity(model, demo_shards, batch_size=8, max_batches=1, seed=meta["config"]["data"]["seed"])
    trainer = next(m for m in read_metrics(trained_run) if m["step"] == STEPS)
    assert ours["samples"] == 8
    assert ours["loss"] == pytest.approx(trainer["val_loss"], abs=1e-4)
    for name, s in ours["per_source"].items():
        assert s["loss"] == pytest.approx(trainer[f"val_loss/{name}"], abs=1e-4)
        assert s["tokens"] == trainer[f"val_tokens/{name}"]


# ---- the adapter computes scores with our model -------------------------------------------------
def test_adapter_scores_are_our_models_loss(trained):
    model, sp = trained
    lm = SlimPajamaLM(model, sp, batch_size=4)
    short = "Return the number of items in the container."
    ids = sp.encode(short)
    # log p(text | EOS) from our forward pass is the trainer's loss times the token count.
    with torch.no_grad():
        inputs = torch.tensor([[sp.eos_id()] + ids[:-1]])
        expected = -float(lm_loss(model(inputs), torch.tensor([ids]), per_sample=True)) * len(ids)
    long = " ".join([short] * 12)  # > max_seq_len tokens: several rolling windows
    rolling_short, rolling_long = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)
                                                            for t in (short, long)])
    assert rolling_short == pytest.approx(expected, rel=1e-5)
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)])
    assert ll == pytest.approx(expected, rel=1e-5)

    # Every token of the long text is scored exactly once, in lm-eval's rolling windows (disjoint
    # windows of max_seq_len tokens, each a forward pass of its own; lm-eval defines them), and each
    # window's score is our model's log-probability of its tokens given that window's inputs.
    from lm_eval.utils import get_rolling_token_windows

    long_ids = sp.encode(long)
    assert len(long_ids) > model.cfg.max_seq_len
    windows = list(get_rolling_token_windows(token_list=long_ids, prefix_token=sp.eos_id(),
                                             max_seq_len=model.cfg.max_seq_len, context_len=1))
    assert len(windows) >= 2 and [t for _, pred in windows for t in pred] == long_ids
    manual = 0.0
    with torch.no_grad():
        for inputs, pred in windows:
            logp = F.log_softmax(model(torch.tensor([inputs]))[0, -len(pred):].float(), -1)
            manual += float(logp[torch.arange(len(pred)), torch.tensor(pred)].sum())
    assert rolling_long == pytest.approx(manual, rel=1e-5)

    # context/continuation: the continuation's log-probability given the context; greedy flag.
    (ll_cont, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("Return the number of", " items"), 0)])
    assert ll_cont < 0 and isinstance(greedy, bool)


def test_generate_until_is_greedy_and_stops(trained):
    from slimpajama_train.tools.generate import sample

    model, sp = trained
    lm = SlimPajamaLM(model, sp)
    context = "class Transport\n\n"
    (free,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)])
    ctx_ids = sp.encode(context)
    new_ids = sample(model, ctx_ids, 12, temperature=0, eos_id=sp.eos_id())  # generate.py's greedy path
    assert free and free == sp.decode(ctx_ids + new_ids)[len(sp.decode(ctx_ids)):]
    stop = free.split()[1] if len(free.split()) > 1 else free[-1]
    (cut,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert stop not in cut and free.startswith(cut)


def test_lm_eval_scores_trained_above_chance_untrained_not(trained, demo_tasks):
    model, sp = trained
    tasks = ["demo_order_mc", "demo_lastword", "demo_rolling"]
    res_trained = run_lm_eval(model, sp, tasks, str(demo_tasks), batch_size=16)["results"]
    untrained = Transformer(model.cfg, seed=0)  # same shape, random weights
    res_untrained = run_lm_eval(untrained, sp, tasks, str(demo_tasks), batch_size=16)["results"]
    acc_t, acc_u = res_trained["demo_order_mc"]["acc,none"], res_untrained["demo_order_mc"]["acc,none"]
    print(f"demo_order_mc acc: trained {acc_t:.3f}, untrained {acc_u:.3f}; "
          f"lastword ppl {res_trained['demo_lastword']['perplexity,none']:.4g} vs "
          f"{res_untrained['demo_lastword']['perplexity,none']:.4g}; rolling bits/byte "
          f"{res_trained['demo_rolling']['bits_per_byte,none']:.3f} vs "
          f"{res_untrained['demo_rolling']['bits_per_byte,none']:.3f}")
    assert acc_t >= TRAINED_MIN_ACC
    assert acc_u <= UNTRAINED_MAX_ACC
    for task, metric in (("demo_lastword", "perplexity,none"), ("demo_rolling", "bits_per_byte,none"),
                         ("demo_rolling", "word_perplexity,none")):
        assert res_trained[task][metric] < res_untrained[task][metric], (task, metric)


# ---- CLI: JSON and offline W&B, with no network at all ------------------------------------------
def _no_network() -> list[str]:
    """``unshare -rn`` runs the command in a network namespace of its own, without any interface up,
    so any attempt to reach the hub fails; plain run where user namespaces are not allowed."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


def test_cli_offline_json_and_wandb_summary(trained_run, demo_tasks, tmp_path):
    run_id = "evaltest0001"  # the id the trainer's W&B callback keeps in <run_dir>/wandb_run_id
    (trained_run / "wandb_run_id").write_text(run_id + "\n")
    out = tmp_path / "results.json"
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    cmd = [*_no_network(), sys.executable, "-m", "slimpajama_train.tools.evaluate", str(trained_run),
           "--tasks", "demo_order_mc,demo_lastword", "--include-path", str(demo_tasks), "--limit", "8",
           "--batch-size", "8", "--device", "cpu", "--output", str(out), "--wandb", "offline"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["lm_eval"]["results"]["demo_order_mc"]["acc,none"] >= 0
    assert res["lm_eval"]["n-samples"]["demo_order_mc"]["effective"] == 8
    assert json.loads(proc.stdout)["eval/demo_order_mc/acc"] == res["lm_eval"]["results"]["demo_order_mc"]["acc,none"]
    # The summary went to the training run (resumed by id), written offline under its run dir.
    assert res["wandb_run_id"] == run_id
    runs = list((trained_run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    # wandb keeps an offline run's records in a binary log with no Python reader; its keys are plain bytes.
    log = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"eval/demo_order_mc/acc" in log and b"eval/checkpoint" in log


def test_export_folder_scores_like_the_checkpoint(trained_run, trained, tmp_path):
    from slimpajama_train.tools.export import export_checkpoint

    model, _ = trained
    exported, _, where = load_for_eval(export_checkpoint(trained_run, tmp_path / "hf"), "cpu")
    assert (where / "tokenizer.model").is_file()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(exported(tokens), model(tokens))
