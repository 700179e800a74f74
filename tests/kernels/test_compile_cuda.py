"""Every CUDA launch configuration of the Triton kernels compiles for sm_80 and sm_90, and fits. No GPU needed.

`benchmarks/compile_report.py` lists what the launchers would run on CUDA for the presets 125m..7b in
bf16, fp16 and fp32 (through each kernel module's `cuda_launches`, built from the config functions
the launchers call), compiles it with `triton.compile` for both targets, and checks shared memory
against the per-block limit and spills of the memory-bound kernels. It runs here in a subprocess:
tests/conftest.py sets TRITON_INTERPRET=1, and interpreted kernels cannot be compiled.

Compiling everything takes many minutes on 2 cores, so results are kept in
docs/kernels-compiled.json, keyed by each kernel's Triton cache key (a hash of its source and of the
@triton.jit functions it calls), signature, config, target and the Triton version: a launch whose
kernel or config changed is compiled again here, and the launch with the most shared memory of every
kernel is always recompiled and compared with its recorded result. With another Triton version
(`make compat`, a GPU image) nothing is cached and everything compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compile_report.py"
DOC = REPO / "docs" / "kernels-compiled.md"
CACHE = REPO / "docs" / "kernels-compiled.json"
# make compat sets it: with another Triton nothing is cached, and compiling every launch takes long.
SAMPLE = os.environ.get("MEGATRAIN_COMPILE_SAMPLE", "")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    return env


def _python(code: str, cache_dir: Path, timeout: int = 600) -> str:
    env = dict(_env(), TRITON_CACHE_DIR=str(cache_dir))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "report.json"
    command = [sys.executable, str(SCRIPT), "--json", str(out), "--spot-check"]
    env = _env()
    # An empty Triton cache: the spot checks really compile (and nothing of this run leaks out).
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    if SAMPLE:
        command += ["--sample", SAMPLE]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"compile_report.py wrote no report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(out.read_text())
    data["stdout"] = done.stdout
    return data


def test_every_launch_compiles_and_fits(report):
    rows = report["rows"]
    kernels = {row["kernel"] for row in rows}
    assert len(rows) >= len(kernels) * (int(SAMPLE) if SAMPLE else 3)
    # every @triton.jit kernel of the package is covered
    assert kernels == {
        "_rms_norm_fwd_kernel",
        "_rms_norm_bwd_kernel",
        "_swiglu_fwd_kernel",
        "_swiglu_bwd_kernel",
        "_rope_fwd_kernel",
        "_flce_fwd_kernel",
        "_flce_grad_kernel",
        "_silu_fwd_kernel",
        "_silu_bwd_kernel",
        "_scatter_add_kernel",
        "_iha_attn_fwd_kernel",
        "_iha_attn_bwd_preprocess_kernel",
        "_iha_attn_bwd_dkdv_kernel",
        "_iha_attn_bwd_dq_kernel",
        "_projected_adam_update_kernel",
    }
    if not SAMPLE:
        assert {row["dtype"] for row in rows if row["kernel"] == "_rms_norm_fwd_kernel"} == {"bf16", "fp16", "fp32"}
    problems = [f"{row['kernel']} {row['dtype']} {row['config']}: {p}" for row in rows for p in row["problems"]]
    assert not problems, "\n".join(problems)
    for row in rows:
        for target, limit in (("sm_80", 163 * 1024), ("sm_90", 227 * 1024)):
            assert row[target]["shared"] <= limit, row
            if row["memory_bound"]:
                assert row[target]["spill_stores"] == 0, row


def test_recorded_results_match_a_fresh_compile(report):
    assert not report["spot_check_mismatches"], "\n".join(report["spot_check_mismatches"])


def test_committed_report_is_current(report):
    if report["sample"]:
        pytest.skip("a sample of the launches (MEGATRAIN_COMPILE_SAMPLE) cannot regenerate the report")
    committed = json.loads(CACHE.read_text())
    if committed["triton"] != report["triton"]:
        # Another Triton (make compat, a GPU image): the numbers differ, the launches must not.
        def launches(text: str) -> list[str]:
            return [" | ".join(line.split(" | ")[:4]) for line in text.splitlines() if line.startswith("| `")]

        assert launches(report["markdown"]) == launches(DOC.read_text())
        return
    assert not report["compiled"], (
        f"{len(report['compiled'])} launches are not in docs/kernels-compiled.json; run "
        f"python benchmarks/compile_report.py --write docs/kernels-compiled.md"
    )
    assert report["markdown"] == DOC.read_text(), "docs/kernels-compiled.md is stale: regenerate it (see its header)"


def test_an_oversized_tile_fails_the_shared_memory_check(tmp_path):
    """The GaLore/Fira update kernel with 256 x 256 fp32 weight tiles, K tiles of 64 and 3 stages needs
    640 KB of shared memory on sm_90 (Triton 3.9), over the 227 KB limit: the check used on every
    launch above must refuse it."""
    out = _python(
        f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("compile_report", {str(SCRIPT)!r})
report = importlib.util.module_from_spec(spec); spec.loader.exec_module(report)
from megatrain.kernels import aot, projected_adam
launch = next(l for l in projected_adam.cuda_launches(64) if dict(l.config.constexprs)["PRECISION"] == "tf32")
config = aot.LaunchConfig.of(num_warps=8, num_stages=3, **dict(launch.config.constexprs))
config = config.replace(BLOCK_A=256, BLOCK_B=256, BLOCK_K=64)
big = aot.KernelLaunch(launch.kernel, launch.arg_types, config, False)
result = aot.compile_launch(big, 90)
print(result.shared)
print(report.violations(big, 90, result))
""",
        tmp_path,
    )
    shared, problems = out.strip().splitlines()[-2:]
    assert int(shared) > 227 * 1024
    assert "shared memory" in problems and "> 227 KB" in problems


def test_launchers_take_their_config_from_the_exposed_functions(monkeypatch):
    """The config functions the report compiles are the ones the launchers call (not copies): each
    launcher, run through the interpreter, asks its function for the shape it launches."""
    import torch

    from megatrain import kernels
    from megatrain.kernels import activation, cross_entropy, iha, lowrank, norm, projected_adam, rotary, sparse_lowrank

    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    calls: list[tuple] = []

    def spy(module, name, label=None):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append((label or name, args))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in (
        (norm, "launch_config"),
        (activation, "launch_config"),
        (rotary, "launch_config"),
        (cross_entropy, "launch_config"),
        (iha, "launch_config"),
        (projected_adam, "launch_configs"),
    ):
        spy(module, name)
    spy(lowrank, "launch_config", "lowrank.launch_config")
    spy(norm, "forward_config", "norm.forward_config")
    spy(sparse_lowrank, "launch_config", "sparse_lowrank.launch_config")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=gen, requires_grad=True)
    kernels.rms_norm(x, torch.ones(40)).sum().backward()
    kernels.swiglu(x, x).sum().backward()
    q = torch.randn(1, 2, 3, 8, generator=gen)
    cos, sin = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    kernels.rope(q, q, cos, sin)
    kernels.fused_linear_cross_entropy(x, torch.randn(50, 40, generator=gen), torch.tensor([1, 2, 3]))
    a, b = torch.randn(40, 5, generator=gen, requires_grad=True), torch.randn(5, 7, generator=gen)
    kernels.lowrank_linear(x, a, b).sum().backward()
    mix = torch.randn(2, 2, 2, generator=gen)
    kernels.iha_attention(q, q, q, mix, mix, mix, torch.randn(2, 2, generator=gen))
    weight, proj = torch.randn(6, 9, generator=gen), torch.randn(4, 9, generator=gen)
    moments = torch.zeros(6, 4)
    kernels.projected_adam_update(
        weight,
        proj,
        torch.randn(6, 4, generator=gen),
        moments,
        moments.clone(),
        side="right",
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        step_size=1e-3,
        scale=1.0,
        decay=0.0,
    )
    index = torch.tensor([0, 7, 41, 100])
    kernels.sparse_lowrank_linear(
        x, a, b, torch.randn(4, generator=gen, requires_grad=True), index[index < 280], 1.0
    ).sum().backward()
    seen = {(name, args) for name, args in calls}
    assert ("launch_config", (40,)) in seen  # rms_norm, D = 40
    assert ("norm.forward_config", (40,)) in seen  # rms_norm's forward
    assert ("launch_config", ()) in seen  # swiglu
    assert ("launch_config", (8, 2, 2)) in seen  # rope: d, Hq, Hk
    assert ("launch_config", (50,)) in seen  # cross-entropy: V
    assert ("lowrank.launch_config", ()) in seen  # lowrank's SiLU passes
    assert ("launch_config", (8, torch.float32)) in seen  # iha: d, dtype
    assert ("launch_configs", (4, "cpu")) in seen  # projected adam: r
    assert ("sparse_lowrank.launch_config", ()) in seen  # sparse_lowrank's scatter
