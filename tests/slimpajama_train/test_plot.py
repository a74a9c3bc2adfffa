"""slimpajama-plot: two runs side by side. The checks read the data the figure was drawn from and the
Figure's titles, axis labels and legends, not pixels."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slimpajama_train.tools.plot import draw, figure, load_runs, main, plot_data
from tests.conftest import REPO, tiny_train_overrides
from tests.helpers.launch import run_ranks

SEQ, BATCH = 64, 8  # tokens per step: 512


def _config(run_dir: Path, wandb_name: str | None = None) -> dict:
    """The parts of the trainer's config.json (``{"config_hash", "config": asdict(cfg)}``) the plot reads."""
    return {"config_hash": "0123456789abcdef", "config": {
        "run_dir": str(run_dir), "model": {"dim": 64, "max_seq_len": SEQ},
        "trainer": {"max_steps": 8, "global_batch_size": BATCH, "log_interval": 1, "eval_interval": 4},
        "logger": {"console": True, "metrics_file": True, "wandb": {"enabled": False, "name": wandb_name}}}}


def _eval(loss: float, sources: dict[str, float]) -> dict:
    out = {"val_loss": loss, "val_ppl": 2.718 ** loss}
    for src, v in sources.items():
        out[f"val_loss/{src}"] = v
        out[f"val_tokens/{src}"] = 4096
    return out


def _train(step: int, loss: float, mfu: bool) -> dict:
    """A log step's record with the trainer's and SpeedMonitor's keys."""
    rec = {"step": step, "loss": loss, "lr": 1e-3 * min(1.0, step / 2), "grad_norm": 0.8, "skipped_steps": 0,
           "tokens_seen": step * BATCH * SEQ, "step_time_s": 0.03, "tokens_per_s": 17000.0 + step,
           "tokens_per_s_per_device": 8500.0, "data_wait_s": 0.003, "peak_mem_gb": 0.47}
    if mfu:
        rec["mfu"] = 0.31
    return rec


def write_run(run_dir: Path, records: list[dict], config: dict | None = None, tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    return run_dir


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    """Run "base": logs every step, evaluates at 0/4/8 on two sources, reports MFU.
    Run "wide": logs every other step, evaluates at 0 and 3 (between log steps) on one source, no MFU,
    and is still writing (a truncated last line)."""
    base = [{"step": 0, **_eval(7.0, {"RedPajamaGithub": 6.5, "RedPajamaWikipedia": 7.5})}]
    for s in range(1, 9):
        rec = _train(s, 7.0 - 0.1 * s, mfu=True)
        if s % 4 == 0:
            rec.update(_eval(7.0 - 0.1 * s, {"RedPajamaGithub": 6.5 - 0.1 * s, "RedPajamaWikipedia": 7.5 - 0.1 * s}))
        base.append(rec)
    wide = [{"step": 0, **_eval(7.0, {"RedPajamaGithub": 6.4})}, _train(1, 6.9, mfu=False), _train(2, 6.6, False),
            {"step": 3, **_eval(6.3, {"RedPajamaGithub": 5.9})}, _train(4, 6.2, False)]
    a = write_run(tmp_path / "base", base, _config(tmp_path / "base"))
    b = write_run(tmp_path / "runs" / "w1", wide, _config(tmp_path / "w1", wandb_name="wide"),
                  tail='{"step": 5, "loss": 6.1, "l')
    return a, b


def test_figure_of_two_runs_names_runs_sources_and_axes(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp" / "comparison.png"
    main([str(p) for p in two_runs] + ["--out", str(out), "--csv", str(tmp_path / "cmp.csv")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.tmp*"))  # written under a temporary name, then renamed
    assert "truncated last line" in capsys.readouterr().err

    rows = list(csv.DictReader((tmp_path / "cmp.csv").open()))
    assert list(rows[0]) == ["run", "panel", "metric", "step", "x", "y"]
    assert {r["run"] for r in rows} == {"base", "wide"}  # dir name; config.json's logger.wandb.name
    assert {r["metric"] for r in rows} >= {"loss", "val_loss", "lr", "tokens_per_s", "mfu",
                                           "val_loss/RedPajamaGithub", "val_loss/RedPajamaWikipedia"}
    wide_github = [(int(r["step"]), float(r["x"]), float(r["y"])) for r in rows
                   if r["run"] == "wide" and r["metric"] == "val_loss/RedPajamaGithub"]
    assert wide_github == [(0, 0.0, 6.4), (3, 3 * BATCH * SEQ, 5.9)]  # eval-only step 3: tokens interpolated
    assert not [r for r in rows if r["run"] == "wide" and r["step"] == "5"]  # the truncated record

    data = plot_data(load_runs(list(two_runs)))
    assert [p.key for p in data.panels] == ["loss", "lr", "tokens_per_s", "mfu", "val_loss/RedPajamaGithub",
                                            "val_loss/RedPajamaWikipedia"]
    loss = data.panel("loss")
    assert [s.name for s in loss.series] == ["base train", "base val", "wide train", "wide val"]
    assert data.x_is_tokens
    base_val = next(s for s in loss.series if s.name == "base val")
    assert base_val.steps == [0, 4, 8] and base_val.x == [0.0, 2048.0, 4096.0]
    assert data.panel("mfu").series[0].y[0] == pytest.approx(31.0) and data.panel("mfu").missing == ["wide"]
    assert data.panel("val_loss/RedPajamaWikipedia").missing == ["wide"]

    fig = figure(data)
    assert len(fig.axes) == len(data.panels)
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert set(by_title) == {"train and validation loss", "learning rate", "throughput", "MFU",
                             "validation loss: RedPajamaGithub", "validation loss: RedPajamaWikipedia"}
    for ax in fig.axes:
        assert ax.get_xlabel() == "tokens seen (tokens_seen in metrics.jsonl)"
        assert ax.get_ylabel()
    assert by_title["train and validation loss"].get_ylabel() == "cross-entropy (nats/token)"
    assert by_title["MFU"].get_ylabel() == "model FLOPs utilization (%)"
    legend = {t: [x.get_text() for x in ax.get_legend().get_texts()] for t, ax in by_title.items()}
    assert legend["train and validation loss"] == ["base train", "base val", "wide train", "wide val"]
    assert legend["validation loss: RedPajamaGithub"] == ["base", "wide"]
    assert legend["validation loss: RedPajamaWikipedia"] == ["base", "wide: no data"]
    assert legend["MFU"] == ["base", "wide: no data"]
    assert fig._suptitle.get_text() == "base vs wide"
    # what is drawn is what plot_data returned
    line = by_title["validation loss: RedPajamaGithub"].get_lines()[1]
    assert list(line.get_xdata()) == [0.0, 1536.0] and list(line.get_ydata()) == [6.4, 5.9]


def test_empty_panels_say_why(tmp_path):
    """No per-source keys, no MFU, and a run with nothing logged yet: the panels stay and say so."""
    a = write_run(tmp_path / "a", [{"step": 0, "val_loss": 7.0, "val_ppl": 1096.6}, _train(1, 6.9, mfu=False)],
                  _config(tmp_path / "a"))
    b = write_run(tmp_path / "b", [], _config(tmp_path / "b"))
    data = plot_data(load_runs([a, b]))
    assert data.panel("val_loss/*").note.startswith("no per-source validation")
    assert data.panel("mfu").note.startswith("no data")
    assert data.panel("lr").missing == ["b"]
    fig = draw(data, tmp_path / "x.png")
    ax = next(ax for ax in fig.axes if ax.get_title() == "per-source validation loss")
    assert ax.get_legend() is None and "no per-source validation" in ax.texts[0].get_text()
    assert any("no records yet" in n for n in data.notes)


def test_tokens_axis_falls_back_to_config_then_to_steps(tmp_path):
    no_tokens = [{k: v for k, v in _train(s, 6.0, False).items() if k != "tokens_seen"} for s in (1, 2)]
    a = write_run(tmp_path / "a", no_tokens, _config(tmp_path / "a"))
    data = plot_data(load_runs([a]))
    assert data.panel("loss").xlabel == "tokens seen (step × global batch × seq_len, config.json)"
    assert data.panel("loss").series[0].x == [512.0, 1024.0]
    b = write_run(tmp_path / "b", no_tokens)  # no config.json either: x is the step for every run
    data = plot_data(load_runs([a, b]))
    assert not data.x_is_tokens and data.panel("lr").xlabel.startswith("optimizer step")
    assert data.panel("lr").series[1].x == [1.0, 2.0]


def test_resumed_run_last_record_wins_and_garbled_lines_are_reported(tmp_path):
    # An attempt killed mid-write of step 3, then resumed from step 2: a garbled line, step 3 rewritten.
    lines = [json.dumps(_train(s, 6.0, False)) for s in (1, 2)] + [
        '{"step": 3, "loss": 9.9' + json.dumps(_train(3, 5.0, False)), json.dumps(_train(3, 5.5, False))]
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    [loaded] = load_runs([run])
    assert [r["step"] for r in loaded.records] == [1, 2, 3] and loaded.records[-1]["loss"] == 5.5
    assert any("1 unreadable line(s) (first: line 3" in n for n in loaded.notes)


def test_cli_errors_name_the_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert f"{tmp_path / 'empty' / 'metrics.jsonl'}: not found" in capsys.readouterr().err
    run = write_run(tmp_path / "r", [_train(1, 6.0, False)])
    with pytest.raises(SystemExit):
        main([str(run), "--names", "a,b", "--out", str(tmp_path / "x.png")])
    assert "1 run_dir" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_of_a_real_tiny_run(demo_shards, tmp_path):
    """The key names the trainer really writes (a 1-process, 4-step CPU run) give the panels data."""
    run_dir = tmp_path / "tiny"
    run_ranks(1, tiny_train_overrides(demo_shards, run_dir, "checkpoint.interval=0", "trainer.eval_interval=2",
                                         steps=4), cwd=REPO)
    main([str(run_dir), str(run_dir), "--names", "first,again", "--out", str(tmp_path / "real.png")])
    data = plot_data(load_runs([run_dir]))
    assert data.x_is_tokens and data.panel("loss").xlabel == "tokens seen (tokens_seen in metrics.jsonl)"
    assert [s.name for s in data.panel("loss").series] == ["tiny train", "tiny val"]
    assert data.panel("loss").series[1].steps == [0, 2, 4]
    assert data.panel("lr").series and data.panel("tokens_per_s").series
    runs = {r["run"] for r in csv.DictReader((tmp_path / "real.csv").open())}
    assert runs == {"first", "again"}
