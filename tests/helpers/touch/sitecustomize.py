"""Loaded at start-up by every Python process that tests start while ``$SLIMPAJAMA_TOUCH_DIR`` is set
(``make test-fast``: the directory is put on their ``PYTHONPATH``): at exit it writes the project
modules the process imported, so the session can check that the fast suite touched every module,
in child processes (trainer ranks, CLI runs) as well as in its own."""
import atexit
import os
import sys

_DIR = os.environ.get("SLIMPAJAMA_TOUCH_DIR")


def _record() -> None:
    names = sorted(m for m in list(sys.modules) if m.split(".")[0] in ("slimpajama_train", "data_prep"))
    if names:
        path = os.path.join(_DIR, f"{os.getpid()}.txt")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(names) + "\n")
        os.replace(path + ".tmp", path)


if _DIR:
    atexit.register(_record)
