"""Which project modules a test session touched: imported by the pytest process or by any process it
started (recorded by ``tests/helpers/touch/sitecustomize.py``). ``make test-fast`` fails when the fast
suite leaves a module untouched."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOUCH_ENV = "SLIMPAJAMA_TOUCH_DIR"
SITE_DIR = Path(__file__).resolve().parent / "touch"


def project_modules() -> set[str]:
    out = set()
    for pkg in ("slimpajama_train", "data_prep"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            out.add(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return out


def start(touch_dir: Path) -> None:
    """Make every process started from now on record its imports into ``touch_dir``."""
    touch_dir.mkdir(parents=True, exist_ok=True)
    os.environ[TOUCH_ENV] = str(touch_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), os.environ.get("PYTHONPATH")) if p)


def record_this_process() -> None:
    """Write the project modules this process imported into the session's folder now (a pytest-xdist
    worker, before it reports its end: its own exit, where sitecustomize records, may come later than
    the controller's check)."""
    names = sorted(m for m in list(sys.modules) if m.split(".")[0] in ("slimpajama_train", "data_prep"))
    path = Path(os.environ[TOUCH_ENV], f"{os.getpid()}.txt")
    path.with_suffix(".tmp").write_text("\n".join(names) + "\n")
    path.with_suffix(".tmp").replace(path)


def untouched(touch_dir: Path) -> list[str]:
    seen = {m for m in sys.modules if m.split(".")[0] in ("slimpajama_train", "data_prep")}
    for record in touch_dir.glob("*.txt"):
        seen.update(record.read_text().split())
    return sorted(project_modules() - seen)
