"""tests/helpers/built_once.py: one build per session across pytest-xdist workers, a failed build retried."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers.built_once import built_once

# A worker: built_once under its own base temp (<root>/popen-gwN, as xdist lays them out); the build
# counts itself and takes long enough that both workers are inside built_once at once.
WORKER = """
import os, sys, time
from pathlib import Path
from tests.helpers.built_once import built_once

class Factory:
    def getbasetemp(self):
        return Path(sys.argv[1]) / os.environ["PYTEST_XDIST_WORKER"]

def build(folder):
    with open(Path(sys.argv[1]) / "builds", "a") as fh:
        fh.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    time.sleep(1)
    (folder / "payload").write_text("built")

print(built_once(Factory(), "thing", build))
"""


def test_two_workers_build_once_and_share_the_folder(tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, env={"PYTEST_XDIST_WORKER": f"gw{i}", "PATH": "/usr/bin"})
               for i in range(2)]
    folders = [w.communicate(timeout=60)[0].strip() for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    assert folders == [str(tmp_path / "shared/thing")] * 2
    assert len((tmp_path / "builds").read_text().splitlines()) == 1  # the other worker waited and reused it
    assert (tmp_path / "shared/thing/payload").read_text() == "built"


def test_a_failed_build_is_cleared_and_built_again(tmp_path_factory):
    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("build failed")

    name = f"retry_{id(tmp_path_factory)}"
    with pytest.raises(RuntimeError, match="build failed"):
        built_once(tmp_path_factory, name, broken)
    folder = built_once(tmp_path_factory, name, lambda f: (f / "whole").write_text("y"))
    assert sorted(p.name for p in folder.iterdir()) == ["whole"]  # nothing of the failed build left
    assert built_once(tmp_path_factory, name, broken) == folder  # built: not run again
