"""Build the demo corpus: a real multi-source corpus in the SlimPajama/RedPajama layout, made from text
every Python installation ships.

- ``RedPajamaGithub``: standard-library source files (code).
- ``RedPajamaWikipedia``: module docstrings (one article per module).
- ``RedPajamaBook``: class and function docstrings of a module, one "chapter" per module.
- ``RedPajamaCommonCrawl``: license and metadata texts of installed distributions (web-like text with
  real near-duplicates: the same licenses under different copyright lines).

Output: ``<out>/train/chunk1/example_train_<i>.jsonl.zst``, one ``{"text", "meta"}`` object a line.
The same machine always gives byte-identical files (sorted inputs, single-shot zstd, no timestamps).

Usage::

    slimpajama-demo-corpus data/demo_corpus [--max-mb-per-source 4]
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import zstandard

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
LICENSE_WORDS = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative name, path) of every standard-library ``.py`` file outside tests and site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath, name)
                out.append((f"stdlib/{path.relative_to(root).as_posix()}", path))
    return sorted(out)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def code_and_docstrings() -> tuple[list[dict], list[dict], list[dict]]:
    """Return (github, wikipedia, book) records from the standard library."""
    github, wiki, book = [], [], []
    for rel, path in stdlib_files():
        text = _read_text(path)
        if text is None:
            continue
        github.append(
            {"text": text, "meta": {"redpajama_set_name": "RedPajamaGithub", "path": rel, "language": "Python"}}
        )
        module = rel[len("stdlib/") : -len(".py")].replace("/", ".").removesuffix(".__init__")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc:
            wiki.append(
                {"text": f"{module}\n\n{doc}\n", "meta": {"redpajama_set_name": "RedPajamaWikipedia", "title": module}}
            )
        sections = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                if d:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    sections.append(f"{kind} {node.name}\n\n{d}\n")
        if sections:
            book.append(
                {
                    "text": f"{module}\n\n" + "\n".join(sections),
                    "meta": {"redpajama_set_name": "RedPajamaBook", "title": module},
                }
            )
    return github, wiki, book


def distribution_texts() -> list[dict]:
    """License and METADATA texts of installed distributions, sorted by name and file."""
    records = []
    dists = sorted(
        importlib.metadata.distributions(), key=lambda d: ((d.metadata["Name"] or "").lower(), d.version or "")
    )
    seen: set[tuple[str, str]] = set()
    for dist in dists:
        name = dist.metadata["Name"] or "unknown"
        candidates = [f for f in (dist.files or []) if any(w in f.name.upper() for w in LICENSE_WORDS)]
        for f in sorted(candidates, key=str) + ["METADATA"]:
            key = (name.lower(), str(f))
            if key in seen:
                continue
            seen.add(key)
            text = dist.read_text(str(f).split("/")[-1]) if f == "METADATA" else _read_text(Path(dist.locate_file(f)))
            if text:
                records.append({"text": text, "meta": {"redpajama_set_name": "RedPajamaCommonCrawl", "url": f"pkg://{name}/{f}"}})
    return records


def _cap(records: list[dict], max_bytes: int | None) -> list[dict]:
    if max_bytes is None:
        return records
    out, total = [], 0
    for r in records:
        n = len(r["text"].encode("utf-8"))
        if total + n > max_bytes:
            break
        out.append(r)
        total += n
    return out


def _interleave(groups: list[list[dict]]) -> Iterator[dict]:
    """Round-robin over sources, so every chunk file mixes domains as SlimPajama's do."""
    iters = [iter(g) for g in groups]
    while iters:
        alive = []
        for it in iters:
            rec = next(it, None)
            if rec is not None:
                yield rec
                alive.append(it)
        iters = alive


def build_demo_corpus(
    out_dir: Path, max_bytes_per_source: int | None = None, docs_per_file: int = 1000,
    with_distributions: bool = True,
) -> dict[str, int]:
    """Write the corpus under ``out_dir/train/chunk1`` and return documents per source.
    ``with_distributions=False`` leaves out ``RedPajamaCommonCrawl``, the one source that depends on
    the packages installed (a new release of any dependency changes it): the rest is a function of the
    Python version alone, which is what a record compared across machines needs."""
    github, wiki, book = code_and_docstrings()
    sources = (github, wiki, book, distribution_texts()) if with_distributions else (github, wiki, book)
    groups = [_cap(g, max_bytes_per_source) for g in sources]
    chunk = Path(out_dir) / "train" / "chunk1"
    chunk.mkdir(parents=True, exist_ok=True)
    for old in chunk.glob("example_train_*.jsonl.zst"):
        old.unlink()
    records = list(_interleave(groups))
    cctx = zstandard.ZstdCompressor(level=10)
    for i in range(0, len(records), docs_per_file):
        payload = "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in records[i : i + docs_per_file]
        ).encode("utf-8")
        path = chunk / f"example_train_{i // docs_per_file}.jsonl.zst"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(cctx.compress(payload))
        os.replace(tmp, path)
    counts: dict[str, int] = {}
    for r in records:
        src = r["meta"]["redpajama_set_name"]
        counts[src] = counts.get(src, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="data/demo_corpus")
    parser.add_argument("--max-mb-per-source", type=float, default=None, help="cap each source at this many MB")
    parser.add_argument("--docs-per-file", type=int, default=1000)
    args = parser.parse_args(argv)
    cap = int(args.max_mb_per_source * 1e6) if args.max_mb_per_source else None
    counts = build_demo_corpus(Path(args.out_dir), cap, args.docs_per_file)
    print(json.dumps({"out_dir": args.out_dir, "documents": counts}))


if __name__ == "__main__":
    main()
