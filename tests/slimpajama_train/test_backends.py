"""Backends behind one interface: equivalence, precision, activation checkpointing, non-finite steps."""
import json
import math
from pathlib import Path

import pytest
import torch

from slimpajama_train.backends import build_backend, hardware
from slimpajama_train.backends.base import BackendConfig
from slimpajama_train.backends.deepspeed_config import deepspeed_config
from slimpajama_train.distributed import DistInfo
from slimpajama_train.optim import OptimConfig
from tests.conftest import REPO, halted_copy, read_metrics
from tests.helpers.built_once import built_once
from tests.helpers.equivalence import compare, step_records
from tests.helpers.launch import HELPERS, run_ranks

EQUIV_STEPS = 24
# The device the trainer runs on here; the probes say what it cannot do, and the tests skip with that.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NO_DEEPSPEED_FP16 = hardware.deepspeed_precision_problem("fp16", DEVICE)
NO_COMPILE = hardware.compile_problem(DEVICE)


def skip_because(reason: str | None) -> pytest.MarkDecorator:
    """Skip where a hardware probe names something this machine lacks (the reason says what)."""
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={shards}", f"run_dir={run_dir}", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "backend.precision=fp32", "data.micro_batch_size=2", "data.num_workers=0",
        "trainer.global_batch_size=8", "trainer.log_interval=1", "trainer.eval_interval=0", "checkpoint.interval=0",
        "optim.warmup_steps=4", "optim.lr=1e-3", "logger.wandb.enabled=false", *extra,
    ]


def _train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


EQUIV_HELPER = REPO / "tests/helpers/equivalence_helper.py"
HSDP = ["backend.replicate_size=2", "backend.shard_size=2"]
# Every layout that must compute the one-process training: (processes, overrides).
LAYOUTS = {
    "accum4_vs_batch4x": (1, ["data.micro_batch_size=8"]),  # one batch 4x larger instead of 4 accumulated
    "fsdp2_2proc": (2, ["backend=fsdp2"]),
    "zero1_2proc": (2, ["backend=zero1"]),
    "zero2_2proc": (2, ["backend=zero2"]),
    "zero3_2proc": (2, ["backend=zero3"]),
    # HSDP: 2 replicas x 2 shards, without (micro-batch 2: 8 = 2 x 1 x 4) and with (micro-batch 1:
    # 2 accumulated micro-batches, the cross-replica all-reduce deferred to the second) accumulation.
    "hsdp_2x2": (4, ["backend=fsdp2", *HSDP]),
    "hsdp_2x2_accum2": (4, ["backend=fsdp2", *HSDP, "data.micro_batch_size=1"]),
}
# Layouts whose equivalence test must fail under each injected bug (equivalence_helper.py).
MUTATED = ("fsdp2_2proc", "hsdp_2x2", "zero2_2proc")
MUTATIONS = ("grad_x2", "drop_micro", "wrong_divisor", "perturb_shard")
MUTATION_STEPS = 4


def _equiv_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """The equivalence runs: no clipping (nothing bounds a wrong gradient), a checkpoint every 4 steps
    (parameters compared at any of them)."""
    return _overrides(shards, run_dir, f"trainer.max_steps={EQUIV_STEPS}", "optim.grad_clip=0",
                      "checkpoint.interval=4", "checkpoint.keep_last=10", *extra)


def _run_cases(nproc: int, cases: list[dict], work: Path) -> None:
    """Run the cases (``overrides``, ``mutation``) one after another in one torchrun launch."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "cases.json").write_text(json.dumps(cases))
    run_ranks(nproc, [], script=EQUIV_HELPER, extra_env={"EQUIV_CASES": str(work / "cases.json")}, timeout=900)


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory) -> Path:
    """One process, 4 micro-batches of 2 accumulated per step: the run every layout must reproduce."""
    run_dir = built_once(tmp_path_factory, "equivalence_reference", lambda run_dir: _run_cases(
        1, [{"overrides": _equiv_overrides(demo_shards, run_dir)}], run_dir / "work"))
    losses = [m["loss"] for m in step_records(run_dir).values()]
    assert len(losses) == EQUIV_STEPS and losses[-1] < losses[0]
    return run_dir


@pytest.fixture(scope="module")
def layout_runs(demo_shards, tmp_path_factory):
    """Per layout, in one launch: the clean run and, for the layouts in MUTATED, one run per injected
    bug (``perturb_shard`` after resuming at step 2); run dirs by case name. Each layout's launch once
    per session (its tests may land on either worker)."""
    done: dict[str, dict[str, Path]] = {}

    def dirs_of(layout: str, root: Path) -> dict[str, Path]:
        return {"clean": root / "clean", **{m: root / m for m in MUTATIONS if layout in MUTATED}}

    def cases(layout: str, root: Path) -> None:
        nproc, extra = LAYOUTS[layout]
        dirs = dirs_of(layout, root)
        specs = [{"overrides": _equiv_overrides(demo_shards, dirs["clean"], *extra)}]
        halt = f"trainer.halt_at_step={MUTATION_STEPS}"
        for m in ("grad_x2", "drop_micro", "wrong_divisor"):
            if m in dirs:
                specs.append({"overrides": _equiv_overrides(demo_shards, dirs[m], halt, *extra), "mutation": m})
        if "perturb_shard" in dirs:
            d = dirs["perturb_shard"]
            specs += [{"overrides": _equiv_overrides(demo_shards, d, "trainer.halt_at_step=2", *extra)},
                      {"overrides": _equiv_overrides(demo_shards, d, halt, *extra), "mutation": "perturb_shard"}]
        _run_cases(nproc, specs, root / "work")

    def run(layout: str) -> dict[str, Path]:
        if layout not in done:
            root = built_once(tmp_path_factory, f"layout_{layout}", lambda root: cases(layout, root))
            done[layout] = dirs_of(layout, root)
        return done[layout]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_trains_as_one_process(reference, layout_runs, layout):
    """Per-step loss and gradient norm (before clipping; grad_clip=0) over 24 steps and every
    parameter at step 24 against the one-process reference (tolerances: tests/helpers/equivalence.py)."""
    diff = compare(layout_runs(layout)["clean"], reference)
    print(f"{layout}: {diff}")
    assert diff.steps == EQUIV_STEPS and diff.within_tolerance, diff


@pytest.mark.slow
@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("layout", MUTATED)
def test_an_injected_bug_fails_the_equivalence(reference, layout_runs, layout, mutation):
    """Negative controls: each bug, injected into the real trainer, puts the run outside the
    tolerances the clean run of the same layout meets (the closing note's table)."""
    diff = compare(layout_runs(layout)[mutation], reference)
    print(f"{layout} with {mutation}: {diff}")
    assert diff.steps == MUTATION_STEPS and not diff.within_tolerance, diff


def _layouts(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("layout.rank*.json"),
                                                      key=lambda p: int(p.stem.split("rank")[1]))]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hsdp_2x2", "hsdp_2x2_accum2", "fsdp2_2proc"])
def test_fsdp2_builds_the_mesh_the_test_claims(layout_runs, layout):
    """HSDP: a (replicate 2, shard 2) mesh; every parameter Replicate over replicas and Shard(0) over
    the shard group: half of it on each rank of a group, the same half on the rank of the other
    replica at the same shard coordinate, both halves adding up to the parameter. FSDP2: one
    dimension of 2 ranks."""
    ranks = _layouts(layout_runs(layout)["clean"])
    hsdp = layout.startswith("hsdp")
    assert len(ranks) == (4 if hsdp else 2)
    for name in ranks[0]["params"]:
        shards = [r["params"][name] for r in ranks]
        for rank, p in enumerate(shards):
            assert p["mesh"] == ([2, 2] if hsdp else [2]), (name, p)
            assert p["mesh_dims"] == (["replicate", "shard"] if hsdp else ["shard"]), (name, p)
            assert p["placements"] == (["R", "S(0)"] if hsdp else ["S(0)"]), (name, p)
            assert p["coordinate"] == ([rank // 2, rank % 2] if hsdp else [rank]), (name, p)
            rows = p["global"][0]
            assert p["local"] == [-(-rows // 2) if p["coordinate"][-1] == 0 else rows // 2, *p["global"][1:]], (name, p)
        groups = [shards[0:2], shards[2:4]] if hsdp else [shards]
        for group in groups:  # the two shards of a group hold the whole parameter
            assert group[0]["local_sum"] + group[1]["local_sum"] == pytest.approx(group[0]["global_sum"], abs=1e-4)
            assert group[0]["local_sum"] != group[1]["local_sum"], name
        if hsdp:  # replicas: the same shard on both
            assert shards[0]["local_sum"] == shards[2]["local_sum"] and shards[1]["local_sum"] == shards[3]["local_sum"]


@pytest.mark.slow
@pytest.mark.parametrize("layout,stage", [("zero1_2proc", 1), ("zero2_2proc", 2), ("zero3_2proc", 3)])
def test_zero_stage_partitions_what_the_stage_claims(layout_runs, layout, stage):
    """ZeRO-1: optimizer state (and fp32 master weights) partitioned, gradients and parameters whole;
    ZeRO-2: gradients partitioned too; ZeRO-3: parameters too. Counted in elements held per rank
    (parameters after the run; gradients: the most held after any micro-batch of step 1)."""
    ranks = _layouts(layout_runs(layout)["clean"])
    assert [r["stage"] for r in ranks] == [stage, stage]
    total = ranks[0]["param_numel"]
    half = pytest.approx(total / 2, rel=0.01)  # partitions are padded to an alignment
    for r in ranks:
        assert r["optimizer_state_held"] == half and r["fp32_master_held"] == half, r
        assert r["grads_held"] == (total if stage == 1 else half), r
        assert r["params_held"] == (half if stage == 3 else total), r


def test_deepspeed_config_is_derived_from_ours(tmp_path):
    cfg = BackendConfig(name="deepspeed", zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True)
    ds = deepspeed_config(cfg, OptimConfig(grad_clip=0.5), micro_batch=4, grad_accum=3, world_size=8)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (96, 4, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" == zero["offload_param"]["device"]
    fp16 = deepspeed_config(BackendConfig(name="deepspeed", precision="fp16"), OptimConfig(), 1, 1, 1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and fp16["fp16"]["initial_scale_power"] == 16


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (3, True), (1, True)])
def test_deepspeed_reduces_and_accumulates_gradients_in_fp32_as_fsdp2(precision, stage, offload):
    # DeepSpeed's defaults would be the compute dtype for both; FSDP2 reduces in fp32.
    cfg = BackendConfig(name="deepspeed", zero_stage=stage, precision=precision, offload_optimizer=offload,
                        offload_params=offload and stage == 3)
    ds = deepspeed_config(cfg, OptimConfig(), 2, 2, 2)
    assert ds["communication_data_type"] == "fp32"
    # The one exception: DeepSpeed 0.19 answers bf16 + fp32 accumulation under ZeRO-1 (without offload)
    # with its BF16_Optimizer, whose checkpoints are not ZeRO checkpoints (zero_to_fp32 cannot read them).
    bf16_accum = precision == "bf16" and stage == 1 and not offload
    assert ds["data_types"] == {"grad_accum_dtype": "bf16" if bf16_accum else "fp32"}


def _user_json(tmp_path: Path, content) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_user_deepspeed_json_overrides_but_cannot_contradict(tmp_path):
    user = _user_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1234, "stage": "auto"},
                                 "train_batch_size": "auto", "gradient_accumulation_steps": 3,
                                 "bf16": {"enabled": "auto"}, "fp16": {"loss_scale_window": 7},  # fp16 is off: inert
                                 "amp": {"enabled": False}, "flops_profiler": {"enabled": False}})
    cfg = BackendConfig(name="deepspeed", zero_stage=2, deepspeed_config=str(user))
    ds = deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    assert ds["zero_optimization"] == {**ds["zero_optimization"], "stage": 2, "reduce_bucket_size": 1234}
    assert ds["flops_profiler"] == {"enabled": False} and ds["bf16"]["enabled"]
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=16 disagrees with the trainer's 4 "
                                         r"\(from data.micro_batch_size=4\)") as err:
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    assert str(user) in str(err.value)
    user.write_text('{"fp16": {"enabled": true}}')
    with pytest.raises(ValueError,
                       match=r"fp16.enabled=true disagrees with the trainer's false \(from backend.precision=bf16\)"):
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)
    user.write_text('{\n  "zero_optimization": {,}\n}')
    with pytest.raises(ValueError, match=r"ds.json:2: invalid JSON"):
        deepspeed_config(cfg, OptimConfig(), 4, 3, 2)


@pytest.mark.parametrize("user,expected", [
    ({"zero_optimization": {"stage": 3}},
     r"zero_optimization.stage=3 disagrees with the trainer's 2 \(from backend.zero_stage=2\)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     r"zero_optimization.offload_optimizer={\"device\": \"cpu\"}: the trainer sets no such key "
     r"\(it follows backend.offload_optimizer=false\)"),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}},
     r"zero_optimization.offload_param=.*backend.offload_params=false"),
    ({"bf16": {"check_grad_overflow": False}},
     r"bf16.check_grad_overflow=false disagrees with the trainer's true \(from backend.precision=bf16\)"),
    ({"bfloat16": {"enabled": True}}, r"bfloat16=.*the trainer sets no such key"),  # DeepSpeed's older name of bf16
    ({"data_types": {"grad_accum_dtype": "bf16"}},
     r"data_types.grad_accum_dtype=\"bf16\" disagrees with the trainer's \"fp32\""),
    ({"communication_data_type": "bf16"}, r"communication_data_type=\"bf16\" disagrees with the trainer's \"fp32\""),
    ({"optimizer": {"type": "Adam"}}, r"optimizer=.*DeepSpeed would ignore this section"),
    ({"scheduler": {"type": "WarmupLR"}}, r"scheduler=.*the trainer sets the learning rate every step"),
    ({"gradient_clipping": 0.5},
     r"gradient_clipping=0.5 disagrees with the trainer's 1.0 \(from optim.grad_clip=1.0\)"),
])
def test_user_deepspeed_json_refuses_every_contradiction_at_any_depth(tmp_path, user, expected):
    cfg = BackendConfig(name="deepspeed", zero_stage=2, precision="bf16",
                        deepspeed_config=str(_user_json(tmp_path, user)))
    with pytest.raises(ValueError, match=expected) as err:
        deepspeed_config(cfg, OptimConfig(grad_clip=1.0), 4, 3, 2)
    assert str(tmp_path / "ds.json") in str(err.value)


def test_user_deepspeed_json_checks_offload_sub_keys_and_the_generated_optimizer(tmp_path):
    cfg = BackendConfig(name="deepspeed", zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True,
                        deepspeed_config=str(_user_json(tmp_path, {
                            "zero_optimization": {"offload_optimizer": {"device": "nvme", "pin_memory": "auto"},
                                                  "offload_param": {"buffer_count": 8}},
                            "optimizer": {"params": {"lr": 0.1, "weight_decay": "auto"}},
                            "fp16": {"enabled": False, "initial_scale_power": 4}})))
    with pytest.raises(ValueError) as err:
        deepspeed_config(cfg, OptimConfig(lr=3e-4), 4, 1, 2)
    msg = str(err.value)
    # every contradiction in one message, each with its path, both values and the setting to change
    assert ('zero_optimization.offload_optimizer.device="nvme" disagrees with the trainer\'s "cpu" '
            "(from backend.offload_optimizer=true)") in msg
    assert ("zero_optimization.offload_param.buffer_count=8: the trainer sets no such key "
            "(it follows backend.offload_params=true)") in msg
    assert ("optimizer.params.lr=0.1 disagrees with the trainer's 0.0003 "
            "(from optim.lr/beta1/beta2/eps/weight_decay") in msg
    assert "fp16" not in msg  # disabled on both sides: its other keys are inert
    assert "pin_memory" not in msg and "weight_decay=" not in msg  # "auto"


def test_build_backend_refuses_deepspeed_fp16_where_the_cpu_has_no_fp16(monkeypatch):
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    monkeypatch.setattr(hardware, "cpu_fp16_problem", lambda: "this CPU lacks fp16 (probe patched)")
    with pytest.raises(ValueError, match=r"backend=zero2 with backend.precision=fp16 needs fp16 support in DeepSpeed's "
                                         r"CPU accelerator \(this CPU lacks fp16 \(probe patched\)\); "
                                         r"use backend.precision=bf16 or fp32, or backend=fsdp2"):
        build_backend(BackendConfig(name="deepspeed", zero_stage=2, precision="fp16"), cpu)
    # bf16 is never refused by DeepSpeed's CPU accelerator, and FSDP2 runs fp16 through torch
    hardware.check_backend_hardware(BackendConfig(name="deepspeed", zero_stage=2, precision="bf16"), cpu.device)
    hardware.check_backend_hardware(BackendConfig(name="fsdp2", precision="fp16"), cpu.device)
    monkeypatch.setattr(hardware, "cpu_fp16_problem", lambda: None)
    hardware.check_backend_hardware(BackendConfig(name="deepspeed", zero_stage=2, precision="fp16"), cpu.device)


def test_offload_is_refused_where_deepspeed_cpu_adam_cannot_be_built(monkeypatch):
    monkeypatch.setattr(hardware, "deepspeed_op_problem", lambda op: f"DeepSpeed's {op} op is not prebuilt (patched)")
    cfg = BackendConfig(name="deepspeed", zero_stage=3, precision="bf16", offload_optimizer=True, offload_params=True)
    with pytest.raises(ValueError,
                       match=r"backend=zero3_offload .*cpu_adam op is not prebuilt.*backend.offload_optimizer=false"):
        hardware.check_backend_hardware(cfg, torch.device("cpu"))


def test_compile_problem_names_the_missing_compiler(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = hardware.compile_problem(torch.device("cpu"))
    assert reason.startswith("trainer.compile=true on CPU needs a C++ compiler") and "trainer.compile=false" in reason


@pytest.mark.slow
@skip_because(None if NO_DEEPSPEED_FP16 else f"DeepSpeed supports fp16 on this {DEVICE.type}: nothing to refuse")
def test_deepspeed_fp16_run_fails_fast_naming_the_missing_cpu_feature(demo_shards, tmp_path):
    proc = run_ranks(2, _overrides(demo_shards, tmp_path, "backend=zero2", "backend.precision=fp16",
                                      "trainer.max_steps=2"), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "backend=zero2 with backend.precision=fp16 needs fp16 support in DeepSpeed's CPU accelerator" in out
    assert NO_DEEPSPEED_FP16 in out and "use backend.precision=bf16 or fp32, or backend=fsdp2" in out
    assert "is not supported on your device" not in out  # refused before DeepSpeed got to it


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
def test_deepspeed_bf16_with_fp32_reduction_trains(demo_shards, tmp_path, backend):
    """The generated data_types / communication_data_type are accepted by each ZeRO stage in bf16
    (2 ranks, 2 accumulated micro-batches per step)."""
    run_ranks(2, _overrides(demo_shards, tmp_path, f"backend={backend}", "backend.precision=bf16",
                               "trainer.max_steps=3", "optim.lr=3e-3", "optim.warmup_steps=1"), cwd=REPO)
    losses = _train_losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("zero2", marks=skip_because(
    NO_DEEPSPEED_FP16 and f"DeepSpeed refuses fp16 on this {DEVICE.type}: {NO_DEEPSPEED_FP16}"))])
def test_fp16_dynamic_loss_scaling_counts_skipped_steps(demo_shards, tmp_path, backend):
    # An initial scale of 2**24 overflows fp16 at once: the first steps are skipped while it halves.
    run_ranks(2, _overrides(demo_shards, tmp_path, f"backend={backend}", "backend.precision=fp16",
                               "trainer.max_steps=14", "backend.initial_loss_scale=16777216",
                               "trainer.max_consecutive_skips=20", "data.micro_batch_size=4"), cwd=REPO)
    metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert metrics[-1]["skipped_steps"] >= 1
    assert metrics[-1]["loss_scale"] < 2.0**24
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]


def _step_memory(demo_shards: Path, nproc: int, cases: dict[Path, list[str]]) -> dict[Path, list[dict]]:
    """Train each case (run folder -> extra overrides) under ``step_memory_helper.py``, all in one
    launch; per case, each rank's tensor-memory report (deterministic bytes)."""
    work = next(iter(cases)).parent
    specs = [{"overrides": _overrides(demo_shards, run_dir, *extra), "out": str(run_dir / "step_memory")}
             for run_dir, extra in cases.items()]
    (work / "step_memory_cases.json").write_text(json.dumps(specs))
    run_ranks(nproc, [], script=HELPERS / "step_memory_helper.py",
                 extra_env={"STEP_MEMORY_CASES": str(work / "step_memory_cases.json")})
    return {run_dir: [json.loads((run_dir / f"step_memory.rank{rank}").read_text()) for rank in range(nproc)]
            for run_dir in cases}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_activation_checkpointing_lowers_peak_memory_not_loss(demo_shards, tmp_path, backend):
    """Through the trainer and each backend (FSDP2 on its sharded path), the tensor memory a step
    creates (``LiveTensorBytes``: the same figure on every CPU and run, unlike the process RSS that
    failed this test on an Intel Xeon) falls none > op > block(2) > full, and the losses do not move.
    The model-level figures and gradients are test_activation_checkpointing.py's."""
    peaks, curves = {}, {}
    shape = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
             "data.micro_batch_size=8", "trainer.max_steps=2", "backend.always_shard=true"]
    modes = ("none", "op", "block", "full") if backend == "fsdp2" else ("none", "block", "full")
    reports = _step_memory(demo_shards, 1, {tmp_path / mode: [f"backend={backend}", *shape,
                                                              f"backend.activation_checkpointing={mode}",
                                                              "backend.ac_every=2"] for mode in modes})
    for mode in modes:
        (report,) = reports[tmp_path / mode]
        peaks[mode] = report["peak_bytes"]
        curves[mode] = _train_losses(tmp_path / mode)
    print(backend, "peak tensor MiB per step:", {m: round(b / 2**20, 1) for m, b in peaks.items()})
    ordered = [peaks[mode] for mode in ("none", "op", "block", "full") if mode in peaks]
    assert ordered == sorted(ordered, reverse=True) and len(set(ordered)) == len(ordered), peaks
    for mode in modes:
        assert curves[mode] == pytest.approx(curves["none"], abs=1e-6), mode


def _inject(demo_shards: Path, run_dir: Path, nproc: int, nan_steps: str, *extra: str) -> dict:
    proc = run_ranks(nproc, _overrides(demo_shards, run_dir, *extra), script=HELPERS / "inject_nonfinite.py",
                        extra_env={"NAN_STEPS": nan_steps})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "zero1", "zero3"])
def test_nonfinite_step_is_skipped_and_its_samples_logged(demo_shards, tmp_path, backend):
    out = _inject(demo_shards, tmp_path, 2, "3", f"backend={backend}", "trainer.max_steps=6")
    assert out["ok"] and out["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "skipped_batches.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 3 and records[0]["positions"] == [16, 24]
    assert len(records[0]["samples"]) == 8 and records[0]["samples"][0][0].startswith("train-")
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert math.isnan(losses[2]) and all(math.isfinite(loss) for i, loss in enumerate(losses) if i != 2)


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run(demo_shards, tmp_path):
    out = _inject(demo_shards, tmp_path, 1, "2,3,4", "trainer.max_steps=8", "trainer.max_consecutive_skips=3")
    assert not out["ok"] and "3 consecutive steps" in out["error"] and out["skipped_steps"] == 3


@pytest.mark.slow
@skip_because(NO_COMPILE)
def test_compiled_blocks_and_loss_match_and_resume(reference, demo_shards, tmp_path):
    """trainer.compile=true (CPU inductor; the default on CUDA): blocks and the chunked loss
    compiled, FSDP2 on 2 ranks, stopped after 4 steps and resumed (compiled again) to 8: the same
    per-step losses, gradient norms and step-8 parameters as the eager one-process reference,
    within the equivalence tolerances (compile reorders fp32 sums, as sharding does)."""
    steps = ["trainer.compile=true", "backend.loss_chunk_tokens=256"]
    run_ranks(2, _equiv_overrides(demo_shards, tmp_path, *steps, "trainer.halt_at_step=4"), cwd=REPO, timeout=900)
    proc = run_ranks(2, _equiv_overrides(demo_shards, tmp_path, *steps, "trainer.halt_at_step=8"), cwd=REPO,
                        timeout=900)
    assert "compile on" in proc.stderr and "resumed from" in proc.stderr
    diff = compare(tmp_path, reference)
    print(f"compiled, 2 ranks, resumed at 4, against the eager reference: {diff}")
    assert diff.steps == 8 and diff.within_tolerance, diff


@pytest.mark.slow
def test_zero3_offload_trains_in_bf16(demo_shards, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeed CPU Adam), bf16 compute."""
    if (reason := hardware.deepspeed_op_problem("cpu_adam")) is not None:
        pytest.skip(reason)
    run_ranks(2, _overrides(demo_shards, tmp_path, "backend=zero3_offload", "backend.precision=bf16",
                               "trainer.max_steps=4", "optim.lr=3e-3"), cwd=REPO, timeout=900)
    losses = _train_losses(tmp_path)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


@pytest.mark.slow
def test_bf16_keeps_fp32_master_weights_and_optimizer_state(demo_shards, tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    run_ranks(2, _overrides(demo_shards, tmp_path, "backend=fsdp2", "backend.precision=bf16", "trainer.max_steps=2"),
                 cwd=REPO)
    meta = FileSystemReader(str(tmp_path / "checkpoints/step_00000002/state")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties") and v.size}
    weights = {k: d for k, d in dtypes.items() if k.startswith("model.")}
    moments = {k: d for k, d in dtypes.items() if "exp_avg" in k}
    assert weights and moments and set(weights.values()) == set(moments.values()) == {torch.float32}


@pytest.mark.slow
def test_fsdp2_gradient_accumulation_holds_sharded_gradients_only(demo_shards, tmp_path):
    """4 micro-batches per step on 2 processes: between micro-batches each rank holds its fp32
    gradient shard, not an unsharded gradient of every parameter (reduce-scatter every micro-batch).
    Measured as the tensor bytes a step's micro-batches leave alive (deterministic, not RSS). The loss
    equivalence with accumulation is test_every_layout_trains_as_one_process[fsdp2_2proc]."""
    run_dir = tmp_path / "accum"
    shape = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4"]
    reports = _step_memory(demo_shards, 2, {run_dir: ["backend=fsdp2", *shape, "data.micro_batch_size=1",
                                                      "trainer.max_steps=3"]})[run_dir]
    for rank, r in enumerate(reports):
        share = r["held_between_micro_bytes"] / r["unsharded_grad_bytes"]
        print(f"rank {rank}: holds +{r['held_between_micro_bytes'] / 2**20:.2f} MiB between micro-batches "
              f"(unsharded fp32 gradients: {r['unsharded_grad_bytes'] / 2**20:.2f} MiB; {share:.3f}x)")
        # The shard is half the gradients (2 ranks), plus small per-micro-batch leftovers.
        assert r["grad_accum"] == 4 and 0.45 < share < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("hsdp_2x2", "fsdp2_2proc"), ("fsdp2_2proc", "hsdp_2x2")],
                         ids=["hsdp4_then_fsdp2_2", "fsdp2_2_then_hsdp4"])
def test_checkpoint_moves_between_hsdp_and_fsdp2(reference, layout_runs, demo_shards, tmp_path, first, second):
    """A DCP checkpoint written under HSDP (2 replicas x 2 shards) resumes under plain FSDP2 on 2
    processes and the other way round; the whole run (losses, gradient norms, step-24 parameters)
    matches the one-process reference. The first half is the first layout's clean run (the same
    overrides) as it stood at its step-12 checkpoint."""
    half = EQUIV_STEPS // 2
    halted_copy(layout_runs(first)["clean"], tmp_path, half)
    nproc, extra = LAYOUTS[second]
    proc = run_ranks(nproc, _equiv_overrides(demo_shards, tmp_path, *extra), cwd=REPO)
    assert f"resumed from {tmp_path}" in proc.stderr and f"step {half}" in proc.stderr
    diff = compare(tmp_path, reference)
    print(f"{first} -> {second}: {diff}")
    assert diff.steps == EQUIV_STEPS and diff.within_tolerance, diff


def test_mesh_shape_defaults_to_one_node_per_shard_group():
    from slimpajama_train.backends.fsdp2 import mesh_shape

    cfg = BackendConfig()
    assert mesh_shape(cfg, world_size=64, local_world_size=8) == (8, 8)  # HSDP across 8 nodes
    assert mesh_shape(cfg, world_size=4, local_world_size=4) == (1, 4)  # one node: plain FSDP2
    assert mesh_shape(BackendConfig(shard_size=16), 64, 8) == (4, 16)
    assert mesh_shape(BackendConfig(replicate_size=2), 64, 8) == (2, 32)
    with pytest.raises(ValueError, match="backend.shard_size=3"):
        mesh_shape(BackendConfig(shard_size=3), 64, 8)


def test_reshard_policy_per_unit():
    from slimpajama_train.backends.fsdp2 import reshard_policy

    big, small = 7_000_000_000, 10_000_000
    assert reshard_policy(BackendConfig(), 4, big) == [True, True, True, False]  # the last block stays gathered
    assert reshard_policy(BackendConfig(), 4, small) == [False] * 4  # small: nothing is resharded
    assert reshard_policy(BackendConfig(reshard_after_forward=True), 3, small) == [True] * 3
    assert reshard_policy(BackendConfig(reshard_after_forward=False), 3, big) == [False] * 3


def test_compile_defaults_to_on_for_cuda_and_off_on_cpu(monkeypatch):
    """trainer.compile=null: on for CUDA where it can work (a log line says why not otherwise), off
    on CPU; an explicit true that cannot work is refused with the reason."""
    import slimpajama_train.trainer as trainer_module
    from slimpajama_train.config import TrainConfig, TrainerConfig

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    auto = TrainConfig(trainer=TrainerConfig(compile=None))
    monkeypatch.setattr(trainer_module, "compile_problem", lambda device: None)
    assert trainer_module.resolve_compile(auto, cuda)[0].trainer.compile is True
    assert trainer_module.resolve_compile(auto, cpu)[0].trainer.compile is False
    monkeypatch.setattr(trainer_module, "compile_problem", lambda device: "no triton")
    resolved, note = trainer_module.resolve_compile(auto, cuda)
    assert resolved.trainer.compile is False and "no triton" in note
    with pytest.raises(ValueError, match="trainer.compile=true: no triton"):
        trainer_module.resolve_compile(TrainConfig(trainer=TrainerConfig(compile=True)), cuda)
    assert auto.trainer.compile is None  # the given config is not changed
