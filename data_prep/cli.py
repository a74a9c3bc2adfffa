"""How every entry point reports a user's mistake: one or two lines that name the key, file or value
and the fix, with the traceback one switch away.

- Hydra entry points (``slimpajama-train``, ``slimpajama-prep``) run through :func:`hydra_cli`. An
  unknown key, a value of the wrong type, a missing config group option, or a value a config
  dataclass refuses in ``__post_init__`` ends in two lines on stderr and exit status 2;
  ``HYDRA_FULL_ERROR=1`` shows the traceback instead. In the job itself, a :class:`UserError`,
  ``ValueError`` or ``OSError`` (a corrupt checkpoint, a changed dataset, a full disk, a shard past
  the vocabulary: messages that name the fix) ends in two lines and exit status 1; any other error
  (a bug) keeps Hydra's report with its traceback.
- argparse entry points (``slimpajama-export``, ``-generate``, ``-eval``, ``-study``) add
  :func:`add_debug_flag` and run inside :func:`cli_errors`: any exception ends in one line plus a
  hint, exit status 1; ``--debug`` shows the traceback.

This module lives in ``data_prep`` because both packages use it and ``data_prep`` imports nothing
from ``slimpajama_train``; it imports only the standard library at import time (Hydra, OmegaConf and
tqdm inside the functions), so a trainer start loads nothing else of ``data_prep`` for it
(``tests/slimpajama_train/test_structure.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
CONFIG_ERROR_EXIT = 2


def conf_dir() -> Path:
    """The Hydra config directory: ``$SLIMPAJAMA_CONF_DIR``, else ``conf/`` at the repository root."""
    env = os.environ.get("SLIMPAJAMA_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "prep.yaml").is_file():
        raise FileNotFoundError(f"no Hydra configs at {path}: install the repository in editable mode "
                                "(pip install -e .) or set SLIMPAJAMA_CONF_DIR")
    return path


class UserError(Exception):
    """A problem with the user's input or files whose message already names the file, key or value
    and what to do (a checkpoint that is corrupt, a dataset that changed, a full disk): entry points
    print it in one or two lines, without the traceback. Subclasses also derive from the builtin
    type that fits (``ValueError``, ``OSError``, ``RuntimeError``), so callers can catch those."""


class ConfigError(UserError, ValueError):
    """A config the dataclasses refuse; the message names the key and the fix."""


def user_message(exc: BaseException) -> str:
    """The message of ``exc`` for a user: an error re-raised from a DataLoader worker carries the
    worker's traceback in its text, of which the last line is the error itself."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text or type(exc).__name__


def to_config(dcfg: Any) -> Any:
    """``OmegaConf.to_object`` (the dataclasses' ``__post_init__`` checks run here); any failure is a
    :class:`ConfigError` with a one-line message, the original exception chained."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(dcfg)
    except Exception as exc:
        raise ConfigError(describe_config_error(exc)) from exc


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _key_suggestion(cause: Any) -> str:
    """`` did you mean trainer.max_steps?`` for a misspelt key of a dataclass node, else ``""``."""
    full_key, key = getattr(cause, "full_key", None), getattr(cause, "key", None)
    owner = getattr(cause, "object_type", None)
    if not (full_key and key and owner is not None and dataclasses.is_dataclass(owner)):
        return ""
    names = [f.name for f in dataclasses.fields(owner)]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if not close:
        return f"; {owner.__name__} has {', '.join(names)}"
    parent = str(full_key).rpartition(".")[0]
    return f"; did you mean {parent + '.' if parent else ''}{close[0]}?"


def describe_config_error(exc: BaseException) -> str:
    """One line for a config error of Hydra, OmegaConf or a config dataclass: the key, what is wrong, the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        missing = exc.missing_cfg_file or _first_line(str(exc))
        group, _, option = str(missing).rpartition("/")
        if exc.options and group:
            return (f"{group}={option}: no such option; choose one of {', '.join(exc.options)} "
                    f"(or add conf/{missing}.yaml)")
        return _first_line(str(exc))
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override {exc.override!r}: {_first_line(exc.message)} (expected key=value)"
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return f"{key}: no such key{_key_suggestion(cause)} (the --cfg job flag prints every key)"
        if isinstance(cause, MissingMandatoryValue):
            return f"{key}: has no value; set it on the command line ({key}=...)"
        return f"{key}: {_first_line(getattr(cause, 'msg', '') or str(cause))}"
    # A dataclass's __post_init__ names the override already ("optim.lr=-1.0: must be > 0").
    return _first_line(str(exc)) or type(exc).__name__


def _print_error(text: str) -> None:
    """``text`` on stderr on lines of its own: tqdm.write clears a progress bar still drawn (a run that
    stopped mid-way leaves one on the line) and redraws it below."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


def _report(prog: str, message: str, hint: str) -> None:
    _print_error(f"{prog}: config error: {message}\n({hint})")


def hydra_cli(prog: str, config_name: str, task: Callable[[Any], None]) -> None:
    """Run ``task(dcfg)`` under ``@hydra.main`` with ``conf/<config_name>.yaml``; config errors (Hydra's
    composition, or a :class:`ConfigError` from :func:`to_config` in ``task``) end in two lines and
    exit status 2, unless ``HYDRA_FULL_ERROR=1``."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    full = os.environ.get(FULL_ERROR_ENV) == "1"
    hint = f"set {FULL_ERROR_ENV}=1 for the traceback"

    @hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")
    def _app(dcfg: Any) -> None:
        if not full:
            os.environ.pop(FULL_ERROR_ENV, None)  # the job's own errors: Hydra's report, as before
        try:
            task(dcfg)
        except ConfigError as exc:
            if full:
                raise
            _report(prog, str(exc), hint)
            sys.exit(CONFIG_ERROR_EXIT)
        except (UserError, ValueError, OSError) as exc:  # ours name the fix (other errors keep Hydra's report)
            if full:
                raise
            _print_error(f"{prog}: error: {user_message(exc)}\n({hint})")
            sys.exit(1)

    # Composition errors (unknown key, bad type, missing option) happen before the job: with the
    # variable set, Hydra raises them to us instead of printing its own report.
    os.environ[FULL_ERROR_ENV] = "1"
    try:
        _app()
    except (HydraException, OmegaConfBaseException) as exc:
        if full:
            raise
        _report(prog, describe_config_error(exc), hint)
        sys.exit(CONFIG_ERROR_EXIT)
    finally:
        if not full:
            os.environ.pop(FULL_ERROR_ENV, None)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


@contextmanager
def cli_errors(prog: str, debug: bool) -> Iterator[None]:
    """An exception ends the command in one line (``prog: error: ...``) and exit status 1; with
    ``debug``, it propagates with its traceback."""
    try:
        yield
    except Exception as exc:
        if debug:
            raise
        # Ours name the file, key or value and the fix; others keep their type for a bug report.
        text = user_message(exc)
        if not isinstance(exc, (ValueError, OSError, UserError)):
            text = f"{type(exc).__name__}: {text}"
        _print_error(f"{prog}: error: {text}\n(run with --debug for the traceback)")
        sys.exit(1)
