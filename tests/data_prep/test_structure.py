"""data_prep's shape: no import cycles, one stage list, and a shard format the trainer imports alone."""
import ast
import subprocess
import sys

from data_prep.stages import STAGES
from tests.conftest import REPO


def _imports(path) -> set[str]:
    """data_prep modules a file imports anywhere (module level or inside functions), except the
    ones under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("data_prep."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("data_prep."))
    return out


def test_no_import_cycles_in_data_prep():
    graph = {f"data_prep.{p.stem}": _imports(p) for p in (REPO / "data_prep").glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [mod, dep])
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


def test_one_declarative_stage_list():
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names)
    assert names[0] == "clean" and names[-1] == "report"
    assert all(callable(s.run) and s.run.__module__ == "data_prep.stages" for s in STAGES)
    # the stage functions are named as verbs, the stages as nouns
    assert all(s.run.__name__.split("_")[0] in {"clean", "compute", "verify", "find", "record", "split", "train",
                                                "tokenize", "plan", "write", "report"} for s in STAGES)


def test_a_trainer_start_loads_the_shard_format_storage_and_cli_conventions_only():
    """A trainer start (``slimpajama-train --cfg job``: the import, Hydra's composition, the config
    check) loads, of ``data_prep``, the shard format, the storage locations and the shared error/CLI
    conventions (standard library only; fsspec when a URL is read), not the prep pipeline: no dedup,
    tokenizer or SentencePiece. Before the layout change it loaded 12 ``data_prep`` modules and
    SentencePiece (``conf_dir`` sat in ``data_prep.config``)."""
    code = ("import atexit, runpy, sys\n"
            "def report():\n"
            "    print(sorted(m for m in sys.modules if m.startswith('data_prep')), file=sys.stderr)\n"
            "    print(sorted({m.split('.')[0] for m in sys.modules\n"
            "                  if m.split('.')[0] in ('sentencepiece', 'rensa', 'ftfy', 'scipy')}), file=sys.stderr)\n"
            "atexit.register(report)\n"
            "sys.argv = ['slimpajama-train', '--cfg', 'job']\n"
            "runpy.run_module('slimpajama_train.train', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "max_steps" in out.stdout  # the job's config was composed and printed
    prep_modules, heavy = out.stderr.strip().splitlines()[-2:]
    assert prep_modules == "['data_prep', 'data_prep.cli', 'data_prep.shard_format', 'data_prep.storage']"
    assert heavy == "[]"


def test_changing_how_a_run_executes_never_changes_a_config_hash():
    from data_prep.config import PrepConfig, RunConfig
    from data_prep.stages import stage_hashes

    base = stage_hashes(PrepConfig())
    assert stage_hashes(PrepConfig(run=RunConfig(workers=7, force=True, stage="plan", task_index=3,
                                                 bucket_memory_mb=100))) == base
    assert stage_hashes(PrepConfig(run=RunConfig(num_tasks=4)))["clean"] != base["clean"]  # it sets the parts


def test_mixture_independent_work_is_shared_when_the_tokenizer_sample_ignores_the_mixture():
    """With tokenizer.sample_by_mixture=false every stage before ``plan`` has the same hash for any
    mixture (what slimpajama-study reuses); by default the tokenizer follows the mixture."""
    from data_prep.config import PrepConfig
    from data_prep.mixture import MixtureConfig
    from data_prep.stages import stage_hashes
    from data_prep.tokenizer import TokenizerConfig

    def hashes(mixture: MixtureConfig, by_mixture: bool) -> dict[str, str]:
        return stage_hashes(PrepConfig(mixture=mixture, tokenizer=TokenizerConfig(sample_by_mixture=by_mixture)))

    a, b = MixtureConfig(), MixtureConfig(weights={"RedPajamaGithub": 2.0})
    names = [s.name for s in STAGES]
    before_plan = names[: names.index("plan")]
    assert [hashes(a, False)[n] for n in before_plan] == [hashes(b, False)[n] for n in before_plan]
    assert hashes(a, False)["plan"] != hashes(b, False)["plan"]
    assert hashes(a, True)["tokenizer"] != hashes(b, True)["tokenizer"]
