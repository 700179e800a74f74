"""megatrain.optim.deepspeed_adapter: the installed DeepSpeed has every internal megatrain relies on,
pyproject pins the tested versions, and a DeepSpeed whose internals moved fails in one line naming
what is missing and the tested range, at start-up (class level) and where instances are handed in.
The slow test drives the adapter against a real single-process ZeRO-2 engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from megatrain.optim import deepspeed_adapter as adapter
from megatrain.optim.deepspeed_adapter import (
    RELORA,
    TESTED_DEEPSPEED,
    ZERO_STEP,
    DeepSpeedInternalsError,
    check_deepspeed_internals,
)
from tests.conftest import REPO, child_env, free_port


def _assert_loud(err: pytest.ExceptionInfo, *fragments: str) -> None:
    import deepspeed

    message = str(err.value)
    assert "\n" not in message
    for fragment in (*fragments, f"DeepSpeed {deepspeed.__version__}", f"deepspeed{TESTED_DEEPSPEED}"):
        assert fragment in message, (fragment, message)


def test_installed_deepspeed_has_every_internal_and_is_in_the_tested_range():
    import deepspeed
    from packaging.specifiers import SpecifierSet

    check_deepspeed_internals([ZERO_STEP, RELORA])
    check_deepspeed_internals()  # the default: every feature
    assert deepspeed.__version__ in SpecifierSet(TESTED_DEEPSPEED), deepspeed.__version__


def test_pyproject_pins_the_tested_range():
    text = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"deepspeed([^"]*)"', text)
    assert pins == [TESTED_DEEPSPEED], pins
    assert "<" in TESTED_DEEPSPEED  # an upper bound: internals move between minor versions


@pytest.mark.parametrize(
    "module_name, path, feature",
    [
        ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.scaled_global_norm", ZERO_STEP),
        ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.step", ZERO_STEP),
        ("deepspeed.utils", "lazy_init_hp_params_optimizer_state", RELORA),
        ("deepspeed.utils", "safe_set_full_optimizer_state", RELORA),
    ],
)
def test_missing_internal_fails_loudly(monkeypatch, module_name, path, feature):
    import importlib

    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    monkeypatch.delattr(owner, name)
    with pytest.raises(DeepSpeedInternalsError) as err:
        check_deepspeed_internals([feature])
    _assert_loud(err, f"{module_name}.{path}", feature)
    other = RELORA if feature == ZERO_STEP else ZERO_STEP
    check_deepspeed_internals([other])  # a run without that feature does not need it


def test_moved_module_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.stage_1_and_2", None)  # import raises ImportError
    with pytest.raises(DeepSpeedInternalsError) as err:
        check_deepspeed_internals([ZERO_STEP])
    _assert_loud(err, "module deepspeed.runtime.zero.stage_1_and_2", ZERO_STEP)


def test_removed_dataclass_field_fails_loudly(monkeypatch):
    from deepspeed.utils.tensor_fragment import tensor_fragment

    fields = {k: v for k, v in tensor_fragment.__dataclass_fields__.items() if k != "optim_fragment"}
    monkeypatch.setattr(tensor_fragment, "__dataclass_fields__", fields)
    monkeypatch.delattr(tensor_fragment, "optim_fragment")
    with pytest.raises(DeepSpeedInternalsError) as err:
        check_deepspeed_internals([RELORA])
    _assert_loud(err, "deepspeed.utils.tensor_fragment.tensor_fragment.optim_fragment")


def test_untested_version_with_the_internals_only_warns(monkeypatch, caplog):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with caplog.at_level("WARNING", logger=adapter.__name__):
        check_deepspeed_internals([ZERO_STEP])
    assert "DeepSpeed 0.99.0 is outside" in caplog.text and TESTED_DEEPSPEED in caplog.text


def test_unknown_feature_is_a_bug_not_a_user_error():
    with pytest.raises(ValueError, match="unknown feature"):
        check_deepspeed_internals(["galore"])


def test_start_up_check_covers_the_run_features(monkeypatch):
    """What the trainer's preflight runs: a MegatrainError (one line, exit 2) only for runs that need it."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from megatrain.engine.deepspeed import check_deepspeed_for
    from megatrain.errors import MegatrainError

    class Cfg:  # the three keys check_deepspeed_for reads
        class optim:
            name = "galore"

        class parallel:
            zero_stage = 2

        class model:
            linear = "dense"

    monkeypatch.delattr(DeepSpeedZeroOptimizer, "scaled_global_norm")
    with pytest.raises(MegatrainError, match="scaled_global_norm"):
        check_deepspeed_for(Cfg)
    Cfg.parallel.zero_stage = 0  # stage 0 fp32 steps the projected weights without ZeRO internals
    check_deepspeed_for(Cfg)


def test_relink_refuses_a_wrapper_without_flat_groups():
    class Wrapper:  # what a DeepSpeed whose ZeRO optimizer renamed its groups would look like
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    with pytest.raises(DeepSpeedInternalsError) as err:
        adapter.relink_optimizer_state(Wrapper())
    _assert_loud(err, "bit16_groups/single_partition_of_fp32_groups", RELORA)
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    adapter.relink_optimizer_state(plain)  # stage 0 fp32: the client itself, nothing to relink
    assert adapter.client_optimizer(Wrapper()) is Wrapper.optimizer


# ---- a real ZeRO-2 engine (one gloo process) ------------------------------------------------------


def _zero2_worker(port: int, out_path: str) -> None:
    """Runs in a child process: a single-rank ZeRO-2 engine over a small model, through the adapter."""
    import os

    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    client = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
    zero_opt = engine.optimizer
    result = {"is_zero": adapter.is_zero_1_2_optimizer(zero_opt), "calls": []}
    extra_sq = torch.tensor(9.0)
    adapter.extend_zero_step(
        zero_opt, lambda: extra_sq, lambda applied, norm, clip: result["calls"].append([applied, float(norm), clip])
    )
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    # The same gradients on a plain copy: ZeRO-2 keeps its own in flat buffers.
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    torch.nn.functional.mse_loss(reference(x), y).backward()
    ours = torch.sqrt(sum(p.grad.pow(2).sum() for p in reference.parameters()))
    engine.step()
    result["module_norm"] = float(ours)
    result["engine_norm"] = float(engine.get_global_grad_norm())
    p = next(model.parameters())
    result["keeps_master"] = adapter.keeps_fp32_master(p)
    adapter.relink_optimizer_state(zero_opt)
    result["state_linked"] = adapter.optimizer_state_linked(p)
    result["client_is_ours"] = adapter.client_optimizer(zero_opt) is client
    del zero_opt.overflow  # a version without it
    try:
        adapter.extend_zero_step(zero_opt, lambda: None, lambda *a: None)
    except DeepSpeedInternalsError as exc:
        result["missing"] = str(exc)
    with open(out_path, "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
def test_adapter_on_a_real_zero2_engine(tmp_path):
    out = tmp_path / "result.json"
    code = (
        "import sys; from tests.optim.test_deepspeed_adapter import _zero2_worker as run; "
        "run(int(sys.argv[1]), sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(free_port()), str(out)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["is_zero"] and result["keeps_master"] and result["state_linked"] and result["client_is_ours"]
    # The extra squared norm (9) joined ZeRO's: the engine reports and clips with the combined norm.
    expected = (result["module_norm"] ** 2 + 9.0) ** 0.5
    assert result["engine_norm"] == pytest.approx(expected, rel=1e-5)
    assert len(result["calls"]) == 1
    applied, norm, clip = result["calls"][0]
    assert applied and norm == pytest.approx(expected, rel=1e-5) and clip == 0.5
    assert "attribute 'overflow'" in result["missing"] and TESTED_DEEPSPEED in result["missing"]


# ---- the lean ZeRO 1/2 step against DeepSpeed's own (one gloo process, bf16) ----------------------


def _lean_worker(port: int, out_path: str, rank: int = 0, world: int = 1) -> None:
    """Runs in a child process (rank `rank` of `world`): for ZeRO 0, 1 and 2 in bf16, DeepSpeed's stock step
    and the lean one (lean_bf16_config + lean_zero_step; lean_stage0_step) from the same weights and batches, with one
    gradient made NaN on rank 0 only (the loss stays finite) at step 3; weights, norms, skips and the
    ops of each step."""
    import copy
    import os

    import deepspeed
    from torch.profiler import ProfilerActivity, profile

    from megatrain.bench.measure import HostReads
    from megatrain.optim.skippable import SkippableAdamW

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    rows = slice(4 * rank, 4 * rank + 4)  # this rank's share of each batch
    batches = [
        (x[rows], y[rows]) for x, y in ((torch.randn(4 * world, 16), torch.randn(4 * world, 16)) for _ in range(5))
    ]
    result = {}
    # "skip": step 4 skipped by the client optimizer's skip_next_step (the host decision, stock DeepSpeed);
    # "drop": the same step dropped by a device flag through drop_step_on_device (the lean step).
    variants = ((False, None), (True, None), (False, "skip"), (True, "drop"))
    extra = {0: ((True, "skip"),), 3: ()}
    for stage in (0, 1, 2, 3):  # 0: DeepSpeed's unfused bf16 optimizer (lean_stage0_step); 3: lean_zero3_step
        for lean, skip4 in (((True, None), (False, "skip"), (True, "drop")) if stage == 3 else variants) + extra.get(
            stage, ()
        ):
            model = copy.deepcopy(base)
            config = {
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 0.05,  # small: every step clips, so the norm matters
                "zero_optimization": {"stage": stage},
                "bf16": {"enabled": True},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 2**31 - 1,
            }
            check = adapter.lean_bf16_config(config, {}) if lean else False
            client = SkippableAdamW(model.parameters(), lr=1e-2)  # megatrain's client: AdamW + skip_next_step
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
            if not lean:
                installed = False
            elif stage == 0:
                installed = adapter.lean_stage0_step(engine.optimizer)
            elif stage == 3:
                installed = adapter.lean_zero3_step(engine.optimizer)
            else:
                installed = adapter.lean_zero_step(engine.optimizer, check)
            norms, skipped, ops, reads = [], [], [], []
            for i, (x, y) in enumerate(batches):
                handle = None
                if i == 2 and rank == 0:
                    handle = model[3].weight.register_hook(lambda g: g * float("nan"))
                loss = torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
                engine.backward(loss)
                if handle is not None:
                    handle.remove()
                if i == 3 and skip4 == "skip":
                    client.skip_next_step = True
                if i == 3 and skip4 == "drop":
                    assert adapter.drop_step_on_device(engine.optimizer, torch.tensor(True))
                counter = HostReads(torch.device("cpu"))
                with profile(activities=[ProfilerActivity.CPU]) as prof, counter:
                    engine.step()
                client.skip_next_step = False
                ops.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
                reads.append(dict(counter.sites))
                skipped.append(bool(engine.optimizer.overflow))
                norms.append(float(engine.get_global_grad_norm()))
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
                weights = [p.detach().float().flatten().tolist() for p in model.parameters()]
            state = [t.flatten().tolist() for st in client.state.values() for t in st.values() if t.dim() > 0]
            result[f"{stage}-{'lean' if lean else 'stock'}{'-' + skip4 if skip4 else ''}"] = {
                "config_check": config["bf16"].get("check_grad_overflow"),
                "installed": installed,
                "norms": norms,
                "skipped": skipped,
                "ops": ops,
                "reads": reads,
                "weights": weights,
                "adam_state": state,
                "loss_finite": bool(torch.isfinite(loss)),
            }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_lean_zero_step_matches_deepspeed_with_fewer_ops(tmp_path, world):
    code = (
        "import sys; from tests.optim.test_deepspeed_adapter import _lean_worker as run; "
        "run(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))"
    )
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(port), str(tmp_path / f"rank{rank}.json"), str(rank), str(world)],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    for key in results[0]:  # ZeRO gathers the updated partitions: every rank holds the same weights
        assert all(r[key]["weights"] == results[0][key]["weights"] for r in results), key
    for result in results:
        _check_lean_against_stock(result)


def _check_lean_against_stock(result: dict) -> None:
    """One rank's result of `_lean_worker`."""
    _check_lean_stage0(result)
    _check_lean_zero3(result)
    for stage in (1, 2):
        stock, lean = result[f"{stage}-stock"], result[f"{stage}-lean"]
        assert stock["config_check"] is None and lean["config_check"] is False and lean["installed"]
        # The NaN gradient of step 3 drops that step on both paths (DeepSpeed reports its norm as inf) ...
        assert stock["skipped"] == lean["skipped"] == [False, False, True, False, False], (stage, stock, lean)
        assert stock["norms"][2] == lean["norms"][2] == float("inf")
        # ... and every other step is the same step: the same norms (fp64 on both), the same weights.
        assert lean["norms"] == stock["norms"]
        assert lean["weights"] == stock["weights"]
        assert stock["loss_finite"]
        # DeepSpeed's scan and fp64 copies are per gradient tensor (12 here): the lean step dispatches fewer ops.
        assert all(a < b for a, b in zip(lean["ops"], stock["ops"])), (stage, lean["ops"], stock["ops"])

        # Host reads of a tensor (each a sync on a GPU) per step, leaving out torch's own (its CPU step
        # counters): DeepSpeed's applied step reads its scan, the norm and the clip (3 here); the lean step
        # reads the norm once, in the adapter, which decides the skip, and nothing else.
        def reads(step_reads: dict) -> dict:
            return {site: n for site, n in step_reads.items() if not site.startswith("torch/")}

        assert [sum(reads(r).values()) for r in stock["reads"]] == [3, 3, 1, 3, 3], stock["reads"]
        for step_reads in lean["reads"] + result[f"{stage}-lean-drop"]["reads"]:
            (site,) = reads(step_reads)
            assert site.startswith("megatrain/optim/deepspeed_adapter.py:") and step_reads[site] == 1, step_reads
        # A finite step dropped by the device flag is the step the client's skip_next_step skips: the same
        # weights and Adam moments after it, bit for bit; DeepSpeed reports the dropped one's norm as inf.
        host, device = result[f"{stage}-stock-skip"], result[f"{stage}-lean-drop"]
        assert device["skipped"] == [False, False, True, True, False] and host["skipped"][3] is False
        assert device["norms"][3] == float("inf") and host["norms"][3] == lean["norms"][3]
        assert device["norms"][:3] == host["norms"][:3] and device["norms"][4] == host["norms"][4]
        assert device["weights"] == host["weights"] and device["adam_state"] == host["adam_state"]
        assert device["weights"] != lean["weights"]  # the dropped step was a real one


def _check_lean_zero3(result: dict) -> None:
    """ZeRO-3: a finite step dropped by the device flag is the step the client's skip_next_step skips."""
    host, device = result["3-stock-skip"], result["3-lean-drop"]
    assert device["installed"]
    assert host["skipped"] == [False, False, True, False, False], host  # the NaN gradient of step 3
    assert device["skipped"] == [False, False, True, True, False], device
    assert device["norms"][3] == float("inf") and device["norms"][:3] == host["norms"][:3]
    assert device["norms"][4] == host["norms"][4]
    assert device["weights"] == host["weights"] and device["adam_state"] == host["adam_state"]
    assert device["weights"] != result["3-lean"]["weights"]  # the dropped step was a real one
    assert result["3-lean"]["skipped"] == host["skipped"]


def _check_lean_stage0(result: dict) -> None:
    """Stage 0 in bf16: DeepSpeed's FP16_UnfusedOptimizer against lean_stage0_step."""
    stock, lean = result["0-stock"], result["0-lean"]
    assert lean["installed"] and not stock["installed"]
    # The NaN gradient of step 3 drops it on both; the others are the same steps up to the norm's precision
    # (fp64 here, fp32 in DeepSpeed's), which moves the clip factor in its last bits.
    assert stock["skipped"] == lean["skipped"] == [False, False, True, False, False], (stock, lean)
    assert stock["norms"][2] == lean["norms"][2] == float("inf")
    for a, b in zip(stock["norms"], lean["norms"]):
        assert a == pytest.approx(b, rel=1e-5), (stock["norms"], lean["norms"])
    for a, b in zip(stock["weights"], lean["weights"]):
        assert a == pytest.approx(b, rel=1e-2, abs=1e-2)  # bf16 weights: one ulp apart at most
    assert sum(x != y for a, b in zip(stock["weights"], lean["weights"]) for x, y in zip(a, b)) <= 5
    assert all(a < b for a, b in zip(lean["ops"], stock["ops"])), (lean["ops"], stock["ops"])

    def reads(step_reads: dict) -> dict:
        return {site: n for site, n in step_reads.items() if not site.startswith("torch/")}

    # DeepSpeed reads every gradient's inf/NaN check (12 tensors) and the norm; the lean step reads once.
    assert all(sum(reads(r).values()) > 12 for i, r in enumerate(stock["reads"]) if i != 2), stock["reads"]
    for step_reads in lean["reads"] + result["0-lean-drop"]["reads"]:
        (site,) = reads(step_reads)
        assert site.startswith("megatrain/optim/deepspeed_adapter.py:") and step_reads[site] == 1, step_reads
    # The device flag drops a finite step exactly as the client's skip_next_step skips it.
    host, device = result["0-lean-skip"], result["0-lean-drop"]
    assert device["skipped"] == [False, False, True, True, False] and device["norms"][3] == float("inf")
    assert device["weights"] == host["weights"] and device["adam_state"] == host["adam_state"]
    assert device["weights"] != lean["weights"]


@pytest.mark.parametrize(
    "bf16, zero, user, turned_off",
    [
        (True, {"stage": 1}, {}, True),
        (True, {"stage": 2}, {}, True),
        (False, {"stage": 2}, {}, False),  # fp32: DeepSpeed scans nothing, its norm check stays
        (True, {"stage": 3}, {}, False),  # ZeRO-3 in bf16 already checks by the norm only
        (True, {"stage": 0}, {}, False),
        (True, {"stage": 2}, {"bf16": {"check_grad_overflow": True}}, False),  # the user's word wins
        (True, {"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, False),
        (True, {"stage": 2, "compute_grad_norm": False}, {}, False),  # no norm to check by
    ],
)
def test_lean_bf16_config_turns_the_scan_off_only_where_the_norm_check_replaces_it(bf16, zero, user, turned_off):
    config = {"bf16": {"enabled": bf16}, "zero_optimization": dict(zero)}
    assert adapter.lean_bf16_config(config, user) is turned_off
    assert ("check_grad_overflow" in config["bf16"]) is turned_off
    if turned_off:
        assert config["bf16"]["check_grad_overflow"] is False


def test_lean_zero_step_leaves_other_optimizers_alone():
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert adapter.lean_zero_step(plain, check_norm=False) is False
    assert adapter.lean_zero_step(plain, check_norm=True) is False
