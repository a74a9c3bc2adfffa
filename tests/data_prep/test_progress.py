"""Progress off a terminal: periodic log lines (interval from $SLIMPAJAMA_PROGRESS_S), never a bar."""
import io
import re

import pytest

from data_prep.prep import run_prep
from tests.data_prep.test_pipeline import _cfg, synthetic_corpus


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_every_interval_and_a_last_one(monkeypatch):
    import data_prep.progress as progress_mod

    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    monkeypatch.setenv("SLIMPAJAMA_PROGRESS_S", "10")
    out = io.StringIO()  # not a terminal
    with progress_mod.Progress("shards 0/4", "block", total=100, stream=out) as p:
        for _ in range(100):
            clock.t += 0.5  # 2 blocks a second: a line every 20 blocks
            p.update()
    lines = out.getvalue().splitlines()
    assert lines[0] == "shards 0/4: 20 of 100 blocks (2/s), 10 s"
    assert len(lines) == 6 and lines[-1] == "shards 0/4: 100 of 100 blocks (2/s), 50 s, done"
    quiet = io.StringIO()  # a loop shorter than the interval prints nothing
    with progress_mod.Progress("clean 1/4", stream=quiet) as p:
        p.update(5)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("SLIMPAJAMA_PROGRESS_S", "0")
    with pytest.raises(ValueError, match="SLIMPAJAMA_PROGRESS_S"):
        progress_mod.Progress("x")


def test_shards_stage_and_tokenizer_training_log_progress(tmp_path, monkeypatch, capfd):
    corpus = synthetic_corpus(tmp_path / "corpus")
    monkeypatch.setenv("SLIMPAJAMA_PROGRESS_S", "0.001")
    run_prep(_cfg(corpus, tmp_path / "out", workers=1))
    err = capfd.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: lines, no bar refreshes
    shards = re.findall(r"^shards 0/1: ([\d,]+) of ([\d,]+) blocks .*$", err, re.M)
    assert shards and shards[-1][0] == shards[-1][1] and int(shards[-1][1].replace(",", "")) > 100
    assert re.search(r"^shards 0/1: .* s, done$", err, re.M)
    assert re.search(r"^tokenizer: training SentencePiece BPE \(300 pieces\) on [\d.]+ MB: [\d.]+ s", err, re.M)
