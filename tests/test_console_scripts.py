"""The console scripts keep their names and their ``--help`` across package reorganizations: the help of
each is compared with the record in ``tests/golden/cli_help/`` (taken before the layout by job). A
deliberate change of a command's options updates the record
(``GOLDEN_UPDATE=1 pytest tests/test_console_scripts.py``) and the commit says why."""
import json
import os
import subprocess
import sys

import tomllib

from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "cli_help"
SCRIPTS = {"slimpajama-prep", "slimpajama-demo-corpus", "slimpajama-train", "slimpajama-export", "slimpajama-generate",
           "slimpajama-demo", "slimpajama-eval", "slimpajama-plot", "slimpajama-study"}

# One interpreter runs every entry point with --help (each exits through SystemExit) and prints the
# texts as JSON: a fresh process, so no state of the test session leaks in.
_RUN_ALL = """
import contextlib, importlib, io, json, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    mod, func = target.split(":")
    sys.argv = [name, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            getattr(importlib.import_module(mod), func)()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    out[name] = buf.getvalue() + (f"\\n[exit {code}]\\n" if code else "")
print(json.dumps(out))
"""


def test_console_script_names_and_help_are_unchanged():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == SCRIPTS
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, "-c", _RUN_ALL, json.dumps(scripts)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.environ.get("GOLDEN_UPDATE") == "1":
        for name, text in helps.items():
            (GOLDEN / f"{name}.txt").write_text(text)
    for name, text in helps.items():
        assert "usage" in text.lower() or "powered by hydra" in text.lower(), (name, text[:300])
        assert text == (GOLDEN / f"{name}.txt").read_text(), (
            f"{name} --help changed; if on purpose, update tests/golden/cli_help with GOLDEN_UPDATE=1 "
            "and say why in the commit")
