"""Fixture outputs built once per test session, whichever pytest-xdist worker asks first.

A session- or module-scoped fixture runs once per *worker*: under ``make test`` (two workers) the demo
shards, the shared tiny runs and each layout's equivalence runs were built twice whenever tests that
use them landed on both workers. :func:`built_once` builds into a folder under the session's common
base (the parent of each worker's own), under a file lock: the first worker builds, the other waits
for it and reuses the folder. Shared folders are read-only to tests; a test that changes one copies it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def session_root(factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this session shares (without xdist: the session's base temp)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<session root>/shared/<name>``, filled by ``build(folder)`` the first time any worker asks.

    A build that raised leaves no marker: the next caller clears what it left and builds again (and
    fails with its own error if the cause remains)."""
    shared = session_root(factory) / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f".{name}.built"  # the marker beside it: the folder is only the build's
    with open(shared / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if done.is_file():
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        build(folder)
        done.touch()
    return folder
