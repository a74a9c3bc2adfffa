"""The docs hold no list of their own that the code could leave behind: the README's layout map names
every module and nothing else, every stage table and the design's stage diagram follow ``STAGES``,
the design's backend interface is the ``Backend`` class's, and every console script named exists."""
import inspect
import re

import tomllib

from data_prep.stages import STAGES
from slimpajama_train.backends.base import Backend
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
DESIGN = (REPO / "docs" / "DESIGN.md").read_text()
SCALE = (REPO / "docs" / "SCALE.md").read_text()


def _layout_block() -> str:
    section = README[README.index("## Layout\n"):]
    return section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]


def layout_map_modules(block: str) -> set[str]:
    """Repository paths of the modules the map names: each entry is a path relative to the package
    heading (an unindented ``name/``) above it; a description may name more (``callbacks/build.py``)."""
    found, package = set(), None
    for line in block.splitlines():
        if line and not line[0].isspace():
            package = line.split()[0].rstrip("/")
            continue
        for rel in re.findall(r"(?<![\w/.$])((?:\w+/)*\w+\.py)\b", line):
            found.add(f"{package}/{rel}")
    return found


def test_the_layout_map_names_every_module_and_nothing_else():
    named = layout_map_modules(_layout_block())
    actual = {str(p.relative_to(REPO)) for pkg in ("data_prep", "slimpajama_train") for p in (REPO / pkg).rglob("*.py")
              if p.name != "__init__.py"}
    assert not actual - named, f"modules missing from README's layout map: {sorted(actual - named)}"
    assert not named - actual, f"README's layout map names modules that do not exist: {sorted(named - actual)}"


def test_the_layout_check_finds_a_missing_and_a_stale_module():
    block = _layout_block()
    named = layout_map_modules(block.replace("  log_window.py", "  old_window.py"))
    assert "slimpajama_train/old_window.py" in named and "slimpajama_train/log_window.py" not in named


def _stage_tables(text: str) -> list[list[tuple[str, str]]]:
    """(stage, tasks) rows of every Markdown table whose header starts ``| stage | tasks |``."""
    tables, rows = [], None
    for line in text.splitlines():
        if line.startswith("| stage | tasks |"):
            rows = []
            tables.append(rows)
        elif rows is not None and line.startswith("|"):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-: "):
                rows.append((cells[0], cells[1]))
        else:
            rows = None
    return tables


def test_every_stage_table_follows_STAGES():
    expected = [(s.name, "n" if s.parallel else "1") for s in STAGES]
    for name, text, count in (("README.md", README, 1), ("docs/DESIGN.md", DESIGN, 1), ("docs/SCALE.md", SCALE, 1)):
        tables = _stage_tables(text)
        assert len(tables) == count, (name, len(tables))
        for rows in tables:
            assert rows == expected, f"{name}: the stage table differs from data_prep/stages.py STAGES"


def test_the_design_diagram_names_the_stages_in_order():
    diagram = DESIGN[DESIGN.index("```\nraw corpora"):DESIGN.index("│  slimpajama_train")]
    chain = diagram[diagram.index("\nclean"):]
    names = re.findall(r"(?:^|→)\s*(\w+)", chain, flags=re.M)
    assert names == [s.name for s in STAGES]


def _backend_paragraph() -> str:
    start = DESIGN.index("Both backends implement one interface")
    return DESIGN[start:DESIGN.index("\n\n", start)]


def test_the_design_lists_the_backend_interface_of_the_Backend_class():
    named = set(re.findall(r"`(\w+)(?:\([^`]*\))?(?: -> \w+)?`", _backend_paragraph()))
    methods = {n for n, f in inspect.getmembers(Backend, inspect.isfunction) if n != "__init__"}
    stale = named - methods - {"Backend", "ValueError"}
    assert not stale, f"docs/DESIGN.md's backend interface names what Backend does not have: {sorted(stale)}"
    abstract = set(Backend.__abstractmethods__)
    assert abstract <= named, f"docs/DESIGN.md's backend interface misses {sorted(abstract - named)}"
    public = {m for m in methods if not m.startswith("_")}
    assert public <= named, f"docs/DESIGN.md's backend interface misses {sorted(public - named)}"


def test_every_console_script_the_docs_name_exists_and_the_design_names_all():
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    for name, text in (("README.md", README), ("docs/DESIGN.md", DESIGN)):
        named = set(re.findall(r"\bslimpajama-[a-z-]*[a-z]\b", text)) - {"slimpajama-pipeline"}  # the distribution
        assert named <= scripts, f"{name} names console scripts that do not exist: {sorted(named - scripts)}"
    layout = DESIGN[DESIGN.index("## Layout\n"):DESIGN.index("At module level, only")]
    assert set(re.findall(r"\bslimpajama-[a-z-]*[a-z]\b", layout)) == scripts
