"""No collective on a CPU tensor over a group that is NCCL-only on GPUs (checkpoint, metrics, preemption)."""
import json
from pathlib import Path

import pytest

from slimpajama_train.distributed import process_group_backend
from tests.conftest import REPO, rank_exit_statuses, tiny_train_overrides
from tests.helpers.launch import run_ranks

GUARD = REPO / "tests/helpers/collective_guard.py"


def test_gpu_default_group_serves_cpu_tensors_with_gloo():
    spec = dict(part.split(":") for part in process_group_backend(cuda=True).split(","))
    assert spec == {"cuda": "nccl", "cpu": "gloo"}
    assert process_group_backend(cuda=False) == "gloo"


def _guarded_run(shards: Path, run_dir: Path, backend: str, *extra: str,
                 env: dict | None = None) -> tuple[list[dict], int, dict[int, int]]:
    """(violations, collectives checked, each rank's exit status) of a guarded 6-step run on 2 ranks."""
    out, status_dir = run_dir / "guard", run_dir / "exit_status"
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = run_ranks(2, tiny_train_overrides(shards, run_dir, "checkpoint.interval=2", *extra, backend=backend,
                                                steps=6),
                        script=GUARD, exit_status=status_dir, extra_env={"GUARD_OUT": str(out), **(env or {})},
                        check=False)
    records = []
    for rank in (0, 1):
        path = Path(f"{out}.rank{rank}")
        assert path.is_file(), proc.stderr[-4000:]
        records += [json.loads(line) for line in path.read_text().splitlines()]
    summaries = [r for r in records if "calls" in r]
    assert len(summaries) == 2
    statuses = rank_exit_statuses(status_dir)
    assert len(statuses) == 2, proc.stderr[-4000:]
    return [r for r in records if "calls" not in r], sum(s["calls"] for s in summaries), statuses


@pytest.mark.slow
@pytest.mark.parametrize("backend,extra", [
    ("fsdp2", ["checkpoint.async_save=true"]),  # the async save is polled every step: a collective per step
    ("zero2", []),
], ids=["fsdp2_async_save", "zero2"])
def test_no_cpu_tensor_collective_on_an_nccl_only_group(demo_shards, tmp_path, backend, extra):
    # SIGTERM on rank 1 after step 3: the stop vote, the save it triggers and the exit all run guarded.
    violations, calls, statuses = _guarded_run(demo_shards, tmp_path, backend, *extra,
                                               env={"GUARD_SIGNAL_STEP": "3", "GUARD_SIGNAL_RANK": "1"})
    print(f"{backend}: {calls} collectives checked, {len(violations)} violations, exit statuses {statuses}")
    assert calls > 50 and not violations, "\n".join(
        f"{v['collective']} at {v['where'][-1]}: {'; '.join(v['problems'])}" for v in violations[:5])
    assert statuses == {0: 75, 1: 75}  # both ranks stopped for requeue
    assert json.loads((tmp_path / "preempted.json").read_text())["step"] in (3, 4)


@pytest.mark.slow
def test_the_guard_catches_cpu_tensors_on_an_nccl_only_default_group(demo_shards, tmp_path):
    """Negative control: with the default group NCCL-only (what init_process_group("nccl") gave
    before), the same run's metric, checkpoint and stop-vote collectives are all flagged."""
    violations, _, statuses = _guarded_run(demo_shards, tmp_path, "fsdp2", "checkpoint.async_save=true",
                                           env={"GUARD_DEFAULT_SPEC": "nccl"})
    assert statuses == {0: 0, 1: 0}  # the guard records violations; the run itself finishes
    where = " ".join(" ".join(v["where"]) for v in violations)
    assert violations and "all_reduce_sum" in where and "checkpoint.py" in where


@pytest.mark.slow
def test_the_guard_catches_a_host_tensor_all_reduced_in_the_loop(demo_shards, tmp_path):
    """Negative control of the project's rule on a CPU run, where every tensor is a CPU tensor: a
    step that all-reduces a host tensor on the default group (guard_mutations.cpu_all_reduce_in_step)
    is flagged at every step, and nothing else is."""
    violations, _, _ = _guarded_run(demo_shards, tmp_path, "fsdp2", env={"GUARD_MUTATION": "cpu_all_reduce_in_step"})
    print(*violations, sep="\n")
    assert len(violations) == 2 * 6  # each rank, each of the 6 steps
    for v in violations:
        assert v["collective"] == "all_reduce" and v["group_backend_on_gpu"] == "cuda:nccl,cpu:gloo"
        assert v["problems"] == [
            "host tensor on a group whose device tensors go over NCCL (cuda:nccl,cpu:gloo on GPUs)"]
        assert "guard_mutations.py" in v["where"][-1] and "train_step" in v["where"][-1]


# torch.distributed's collectives (and point-to-point calls); new_group, queries and the libraries'
# own entry points (dcp.save, a DeepSpeed engine's methods) are not among them.
COLLECTIVE_NAMES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "all_gather_coalesced", "_all_gather_base", "all_gather_object", "all_to_all", "all_to_all_single", "barrier",
    "monitored_barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "all_gather_tensor", "all_reduce_inplace",
}


def direct_collectives(path: Path) -> list[str]:
    """``file:line name`` of every reference to a ``torch.distributed`` collective in ``path``: through
    any import alias (``import torch.distributed as dist``, ``from torch import distributed``,
    ``from torch.distributed import all_reduce``), attribute chains (``torch.distributed.barrier``)
    and ``getattr(dist, "all_gather_single")``."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    modules: dict[str, str] = {}  # local name -> dotted module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full.startswith("torch.distributed") and a.name in COLLECTIVE_NAMES:
                    found.append(f"{path}:{node.lineno} from {node.module} import {a.name}")
                modules[a.asname or a.name] = full

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return modules.get(expr.id)
        if isinstance(expr, ast.Attribute) and (base := dotted(expr.value)):
            return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = dotted(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and (base := dotted(node.args[0]))):
            name = f"{base}.{node.args[1].value}"
        if name and name.startswith("torch.distributed.") and name.rsplit(".", 1)[1] in COLLECTIVE_NAMES:
            found.append(f"{path}:{node.lineno} {name}")
    return sorted(set(found))


def test_only_distributed_py_calls_collectives_directly():
    """Every collective of slimpajama_train and data_prep goes through slimpajama_train/distributed.py
    (where the rules above are kept in one place); backends call their libraries' own functions."""
    sources = [p for d in ("slimpajama_train", "data_prep") for p in sorted((REPO / d).rglob("*.py"))]
    offenders = [hit for p in sources if p != REPO / "slimpajama_train/distributed.py"
                 for hit in direct_collectives(p)]
    assert not offenders, "call the helpers of slimpajama_train/distributed.py instead:\n" + "\n".join(offenders)
    # The scan sees every spelling (a check that cannot fail would prove nothing).
    hits = direct_collectives(REPO / "slimpajama_train/distributed.py")
    assert any("torch.distributed.all_reduce" in h for h in hits) and any("all_gather_object" in h for h in hits)


def test_the_collective_scan_finds_each_spelling(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "from torch.distributed import barrier as b\n"
                   "dist.all_reduce(t)\ntorch.distributed.all_gather_object(o, x)\nd2.broadcast(t, 0)\n"
                   "getattr(torch.distributed, 'all_gather_single', None)\ndist.new_group(backend='gloo')\n"
                   "dist.get_rank()\n")
    hits = [h.split(":", 1)[1] for h in direct_collectives(src)]
    assert hits == ["4 from torch.distributed import barrier", "5 torch.distributed.all_reduce",
                    "6 torch.distributed.all_gather_object", "7 torch.distributed.broadcast",
                    "8 torch.distributed.all_gather_single"]
