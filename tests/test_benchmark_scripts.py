"""The GPU benchmark scripts on a CPU machine: the no-GPU exit, the shell scripts, the pure helpers.

Timings need a GPU and are never taken here; what is checked is the accounting, the judgement and the
formatting that turn timings into the report, on synthetic numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import child_env, free_port

REPO = Path(__file__).resolve().parents[1]
KERNELS_SCRIPT = REPO / "benchmarks" / "kernels.py"
SHELL_SCRIPTS = [REPO / "benchmarks" / "gpu_wheels.sh", REPO / "benchmarks" / "gpu_suite.sh"]


def _load_bench():
    # Loaded from its path under its own name: `kernels` is the repository's kernel package.
    name = "megatrain_bench_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, KERNELS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# ----------------------------------------------------------------------------------------------
# the scripts as programs


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script would run the benchmarks")
def test_kernels_script_without_gpu_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, str(KERNELS_SCRIPT), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert "GPU" in lines[0] and "Traceback" not in lines[0]


def test_kernels_script_rejects_unknown_op_by_name():
    proc = subprocess.run(
        [sys.executable, str(KERNELS_SCRIPT), "--ops", "rms_norm,softmax"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "softmax" in proc.stderr and "rms_norm, rope, swiglu, flce, adam" in proc.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_gpu_suite_rejects_unknown_stage_before_doing_anything(tmp_path):
    proc = subprocess.run(
        ["bash", str(SHELL_SCRIPTS[1]), "benchmark-everything"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, OUT=str(tmp_path / "out"), SITE=str(tmp_path / "site")),
    )
    assert proc.returncode == 2
    assert "unknown stage 'benchmark-everything'" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "site").exists()


@pytest.mark.slow  # about 10 s: two fresh interpreters import torch
def test_gpu_suite_setup_maps_megatrain_kernels_without_an_install(tmp_path):
    """The GPU machine runs the checkout uninstalled: setup's shim must make megatrain.kernels import.

    A throwaway virtual environment sees this interpreter's packages through a plain path line, so
    torch imports but the editable install's finder (a .pth hook, not processed that way) is absent.
    """
    env_dir = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "outer-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    control = subprocess.run(
        [str(python), "-c", "import torch, megatrain.kernels"],
        cwd=tmp_path,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert control.returncode != 0 and "megatrain" in control.stderr, "the check below would prove nothing"

    site, out, wheels = tmp_path / "site", tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    proc = subprocess.run(
        ["bash", str(SHELL_SCRIPTS[1]), "setup"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(clean_env, PYTHON=str(python), SITE=str(site), WHEELS=str(wheels), OUT=str(out)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"megatrain.kernels -> {REPO / 'kernels' / '__init__.py'}" in proc.stdout
    assert (site / "sitecustomize.py").is_file()
    assert "megatrain.kernels ->" in (out / "suite.log").read_text()

    # Anywhere, not only from the repository root, with only the site on PYTHONPATH (never the root).
    anywhere = subprocess.run(
        [
            str(python),
            "-c",
            "import megatrain.kernels.reference as r, megatrain.models as m; print(r.__file__); print(m.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(clean_env, PYTHONPATH=str(site)),
    )
    assert anywhere.returncode == 0, anywhere.stderr
    assert anywhere.stdout.split() == [
        str(REPO / "kernels" / "reference.py"),
        str(REPO / "megatrain" / "models" / "__init__.py"),
    ]


# ----------------------------------------------------------------------------------------------
# accounting


_TINY_DIMS = dict(
    batch=1,
    seq=16,
    hidden=32,
    heads=4,
    kv_heads=2,
    head_dim=16,
    ffn=48,
    tokens=16,
    vocab=64,
    d_in=32,
    d_out=32,
    rank=8,
    rows=40,
    cols=24,
)


@pytest.mark.parametrize("op", bench.OPS)
def test_every_shape_helper_runs_on_cpu(op, monkeypatch):
    """What the GPU run does before its first timing, on CPU: every shape of the sweep gets a label and a
    cost, and each op's case builder (inputs, implementations) and eager implementation run at a shrunken
    copy of its shape. The adam row's parameter shapes come from the 1.3b model built on the meta device,
    which once raised on the GPU machine (the constructor's seed draw read a meta tensor)."""
    for shape in bench.sweep(op) + bench.sweep(op, quick=True):
        assert bench.shape_label(op, shape)
        if op != "adam":
            assert all(bench.op_cost(op, shape, mode) > 0 for mode in bench.op_modes(op))
    if op == "adam":
        shapes = bench.adam_param_shapes("1.3b", 32000)
        assert 1.2e9 < sum(math.prod(s) for s in shapes) < 1.5e9
        return
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    shape = {key: _TINY_DIMS.get(key, value) for key, value in bench.sweep(op, quick=True)[0].items()}
    case = bench.build_case(op, shape, {"liger": None, "apex_rms_norm": None})
    out = bench._as_tuple(case.impls[bench.EAGER](*case.inputs))
    assert len(out) == len(case.output_names) and all(torch.isfinite(t.float()).all() for t in out)


def test_byte_accounting_counts_each_tensor_once():
    t, d, e = 16384, 4096, 2
    assert bench.rms_norm_bytes(t, d, backward=False) == 2 * t * d * e + d * e
    assert bench.rms_norm_bytes(t, d, backward=True) == (2 + 3) * t * d * e + 3 * d * e

    q, k = 1 * 32 * 8192 * 128, 1 * 8 * 8192 * 128
    tables = 2 * 8192 * 64 * 4  # fp32 cos and sin [N, d/2]
    assert bench.rope_bytes(1, 8192, 32, 8, 128, backward=False) == 2 * (q + k) * e + tables
    assert bench.rope_bytes(1, 8192, 32, 8, 128, backward=True) == 2 * (2 * (q + k) * e + tables)

    f = 14336
    assert bench.swiglu_bytes(t, f, backward=False) == 3 * t * f * e
    assert bench.swiglu_bytes(t, f, backward=True) == 8 * t * f * e

    assert bench.adam_bytes(1000) == 7 * 4 * 1000  # param, grad, m, v read; param, m, v written; fp32


def test_flce_flops_forward_and_three_times_for_training():
    forward = bench.flce_flops(8192, 4096, 128256, backward=False)
    assert forward == 2 * 8192 * 4096 * 128256
    assert bench.flce_flops(8192, 4096, 128256, backward=True) == 3 * forward


def test_op_cost_dispatches_to_the_accounting():
    rms = dict(batch=2, seq=8192, hidden=4096)
    assert bench.op_cost("rms_norm", rms, "fwd+bwd") == bench.rms_norm_bytes(16384, 4096, True)
    assert bench.op_cost("swiglu", dict(batch=2, seq=2048, ffn=11008), "fwd") == bench.swiglu_bytes(4096, 11008, False)
    assert bench.op_cost("flce", dict(tokens=16384, hidden=4096, vocab=32000), "fwd") == 2 * 16384 * 4096 * 32000
    with pytest.raises(ValueError):
        bench.op_cost("adam", dict(preset="1.3b", vocab=32000), "fwd")


def test_rates():
    assert bench.gb_per_s(3e9, 1.0) == pytest.approx(3000.0)
    assert bench.tflop_per_s(5e12, 10.0) == pytest.approx(500.0)


# ----------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("op", ["rms_norm", "rope", "swiglu"])
def test_memory_bound_sweeps_are_realistic_training_sizes(op):
    for shape in bench.sweep(op):
        assert 2048 <= shape["seq"] <= 8192
        assert 4096 <= bench.tokens_of(shape) <= 16384
    assert {s.get("hidden") for s in bench.sweep("rms_norm")} == {2048, 4096, 8192}
    assert {s["ffn"] for s in bench.sweep("swiglu")} == {11008, 14336}
    assert all((s["heads"], s["kv_heads"], s["head_dim"]) == (32, 8, 128) for s in bench.sweep("rope"))


def test_flce_sweep_and_quick_subsets():
    shapes = bench.sweep("flce")
    assert {s["vocab"] for s in shapes} == {32000, 128256}
    assert all(s["hidden"] == 4096 and 8192 <= s["tokens"] <= 16384 for s in shapes)
    for op in bench.OPS:
        quick = bench.sweep(op, quick=True)
        assert 1 <= len(quick) <= 2
        assert all(s in bench.sweep(op) for s in quick), "quick numbers must compare with a full run's"
    labels = [bench.shape_label(op, s) for op in bench.OPS for s in bench.sweep(op)]
    assert len(labels) == len(set(labels))


def test_parse_ops():
    assert bench.parse_ops("flce, rms_norm,flce") == ["flce", "rms_norm"]
    with pytest.raises(ValueError, match="layer_norm"):
        bench.parse_ops("rms_norm,layer_norm")
    with pytest.raises(ValueError):
        bench.parse_ops(" , ")


# ----------------------------------------------------------------------------------------------
# judging the targets


def test_memory_bound_targets_pass_and_fail_on_the_thresholds():
    copy_gbps, nbytes = 3000.0, 3 * 10**9  # 3 GB at 3000 GB/s takes 1 ms
    at_90 = bench.judge_memory_bound(
        "swiglu", "s", "fwd", triton_ms=1 / 0.90, compile_ms=1.2, nbytes=nbytes, copy_gbps=copy_gbps, noise=0.02
    )
    assert [t.ok for t in at_90] == [True, True]
    assert at_90[0].value == "90.0%"
    at_80 = bench.judge_memory_bound(
        "swiglu", "s", "fwd", triton_ms=1 / 0.80, compile_ms=1.0, nbytes=nbytes, copy_gbps=copy_gbps, noise=0.02
    )
    assert [t.ok for t in at_80] == [False, False]  # 80% of copy bandwidth; 25% slower than compile
    within_noise = bench.judge_memory_bound(
        "rope", "s", "fwd+bwd", triton_ms=1.01, compile_ms=1.0, nbytes=nbytes, copy_gbps=copy_gbps, noise=0.02
    )
    assert within_noise[1].ok is True
    strict = bench.judge_memory_bound(
        "rope", "s", "fwd+bwd", triton_ms=1.01, compile_ms=1.0, nbytes=nbytes, copy_gbps=copy_gbps, noise=0.0
    )
    assert strict[1].ok is False


def test_memory_bound_targets_with_missing_times():
    errored = bench.judge_memory_bound("rms_norm", "s", "fwd", None, 1.0, 10**9, 3000.0, 0.02)
    assert [t.verdict for t in errored] == ["FAIL", "FAIL"]
    no_compile = bench.judge_memory_bound("rms_norm", "s", "fwd", 1.0, None, 10**9, 3000.0, 0.02)
    assert no_compile[1].ok is None and no_compile[1].verdict == "n/a"


def test_flce_targets():
    gib = 2**30
    good = bench.judge_flce("s", "fwd+bwd", fused_ms=10.5, unfused_ms=10.0, fused_peak=gib, unfused_peak=12 * gib)
    assert [t.ok for t in good] == [True, True]  # 95% of the speed, 8% of the memory
    assert good[0].value == "95.2%" and good[1].value == "8.3%"
    slow_fat = bench.judge_flce(
        "s", "fwd+bwd", fused_ms=12.0, unfused_ms=10.0, fused_peak=2 * gib, unfused_peak=12 * gib
    )
    assert [t.ok for t in slow_fat] == [False, False]
    forward = bench.judge_flce("s", "fwd", fused_ms=1.0, unfused_ms=1.0)
    assert len(forward) == 1 and forward[0].ok is True  # memory is judged on training (fwd+bwd) only
    errored = bench.judge_flce("s", "fwd+bwd", fused_ms=None, unfused_ms=10.0, fused_peak=None, unfused_peak=gib)
    assert [t.verdict for t in errored] == ["FAIL", "FAIL"]
    no_baseline = bench.judge_flce("s", "fwd+bwd", fused_ms=1.0, unfused_ms=None, fused_peak=gib, unfused_peak=None)
    assert [t.verdict for t in no_baseline] == ["n/a", "n/a"]


def test_targets_for_reads_rows_of_every_shape_and_mode():
    shape = dict(batch=2, seq=2048, hidden=4096)
    label = bench.shape_label("rms_norm", shape)
    nbytes = {mode: bench.op_cost("rms_norm", shape, mode) for mode in bench.MODES}
    copy = 3000.0
    rows = []
    for mode in bench.MODES:
        ideal_ms = nbytes[mode] / (copy * 1e9) * 1e3
        rows.append(
            dict(op="rms_norm", shape=label, shape_params=shape, mode=mode, impl=bench.TRITON, median_ms=ideal_ms / 0.9)
        )
        rows.append(
            dict(
                op="rms_norm",
                shape=label,
                shape_params=shape,
                mode=mode,
                impl=bench.COMPILE,
                median_ms=ideal_ms / (0.8 if mode == "fwd" else 0.95),
            )
        )
    targets = bench.targets_for("rms_norm", rows, dict(copy_gbps=copy), noise=0.0)
    assert [(t.mode, t.ok) for t in targets] == [("fwd", True), ("fwd", True), ("fwd+bwd", True), ("fwd+bwd", False)]


def test_verdict_words():
    assert (bench.verdict(True), bench.verdict(False), bench.verdict(None)) == ("PASS", "FAIL", "n/a")


# ----------------------------------------------------------------------------------------------
# formatting and correctness helpers


def test_markdown_table():
    table = bench.markdown_table(["a", "b"], [[1, "x"], [2.5, None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    with pytest.raises(ValueError):
        bench.markdown_table(["a", "b"], [[1]])


def test_slug_and_fmt():
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("NVIDIA H200") == "nvidia-h200"
    assert bench.fmt(None, ".2f") == "-" and bench.fmt(1.234, ".1f") == "1.2"


def test_rel_error():
    ref = torch.tensor([3.0, 4.0])
    assert bench.rel_error(ref.clone(), ref) == 0.0
    assert bench.rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert bench.rel_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    assert bench.rel_error(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), ref) == 0.0
    assert bench.max_abs_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.5)


def _synthetic_report():
    targets = bench.judge_flce("T8192 D4096 V128256", "fwd+bwd", 11.0, 10.0, 2**30, 20 * 2**30)
    return dict(
        environment=dict(
            device="NVIDIA H100 80GB HBM3",
            torch="2.11.0",
            triton="3.6.0",
            cuda="13.0",
            python="3.12.3",
            liger="0.8.5",
            apex="not importable",
        ),
        command="python benchmarks/kernels.py --quick",
        rtol=1e-2,
        noise=0.02,
        ceilings=dict(copy_gbps=3000.0, copy_bytes=2 * 2**30, matmul_tflops=790.0, matmul_n=8192),
        correctness=[
            dict(op="flce", shape="T8192 D4096 V128256", tensor="loss", rel_error=1e-4, max_abs_error=1e-3, ok=True),
            dict(op="flce", shape="T8192 D4096 V128256", tensor="dweight", rel_error=0.5, max_abs_error=1.0, ok=False),
        ],
        results=[
            dict(
                op="flce",
                shape="T8192 D4096 V128256",
                mode="fwd+bwd",
                impl=bench.TRITON,
                median_ms=11.0,
                p20_ms=10.9,
                p80_ms=11.2,
                tflops=600.0,
                matmul_fraction=0.76,
                peak_mem_bytes=2**30,
                speed_vs_unfused=0.909,
                mem_vs_unfused=0.05,
            ),
            dict(op="flce", shape="T8192 D4096 V128256", mode="fwd+bwd", impl="liger", error="OutOfMemoryError: x"),
            dict(
                op="adam",
                shape="1.3b (V32000)",
                mode="step",
                impl="torch-adamw-fused",
                median_ms=12.0,
                p20_ms=11.9,
                p80_ms=12.1,
                gbps=3100.0,
                copy_fraction=1.03,
            ),
        ],
        targets=[dict(bench.dataclasses.asdict(t), verdict=t.verdict) for t in targets],
        skipped={"adam": {"apex-fusedadam": "apex not importable"}},
    )


def test_render_markdown_report():
    text = bench.render_markdown(_synthetic_report())
    assert text.startswith("# megatrain kernel benchmarks on NVIDIA H100 80GB HBM3")
    assert "copy 3000 GB/s (1 GiB bf16 copy_" in text and "bf16 matmul 790 TFLOP/s (8192^3" in text
    assert "Command: `python benchmarks/kernels.py --quick`" in text
    assert "| flce | T8192 D4096 V128256 | dweight | 5.00e-01 | 1.00e+00 | FAIL |" in text
    assert (
        "| T8192 D4096 V128256 | fwd+bwd | megatrain-triton | 11.000 (10.900-11.200) | 600 | 76.0 | 0.91 | 1.00 "
        "| 0.050 |"
    ) in text
    assert "error: OutOfMemoryError: x" in text
    assert "| 1.3b (V32000) | torch-adamw-fused | 12.000 (11.900-12.100) | 3100 | 103.0 |" in text
    assert "Not run: apex-fusedadam (apex not importable)" in text
    assert ">= 90% of unfused speed | 90.9% | PASS |" in text
    assert "< 10% of unfused peak memory | 5.0% | PASS |" in text
    assert text.rstrip().endswith("2 PASS, 0 FAIL, 0 n/a")


# ----------------------------------------------------------------------------------------------
# benchmarks/memory.py


MEMORY_SCRIPT = REPO / "benchmarks" / "memory.py"


def _load_memory():
    name = "megatrain_bench_memory"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MEMORY_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_memory_measure_counts_each_storage_once():
    """Tied weights, a view and a shared optimizer-state tensor are counted once; projections split out."""
    mem = _load_memory()
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].attn = torch.nn.Linear(4, 6, bias=False)
    model.blocks[0].attn_norm = torch.nn.LayerNorm(4, elementwise_affine=False)
    model.blocks[0].attn.register_buffer("index", torch.arange(5))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.blocks[0].attn(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    shared = torch.zeros(3)
    opt.state[model.blocks[0].attn.weight]["extra"] = [shared, shared[1:]]
    m = mem.measure(model, opt)
    assert (m.params.proj_bytes, m.params.other_bytes) == (24 * 4, 40 * 4)
    assert (m.grads.proj_bytes, m.grads.other_bytes) == (24 * 4, 40 * 4)
    assert m.buffers.proj_bytes == 5 * 8 and m.buffers.other_bytes == 0
    # AdamW: exp_avg + exp_avg_sq (+ a 4-byte step tensor) per parameter; the extra list counts 3 floats.
    assert m.state.proj_bytes == 2 * 24 * 4 + 4 + 3 * 4
    assert m.state.other_bytes == 2 * 40 * 4 + 4
    # A nested optimizer (GaLore/Fira keep the projected weights in `optimizer.projected`) is walked too.
    opt.projected = torch.optim.SGD([model.blocks[0].attn.weight], lr=0.1, momentum=0.9)
    model.blocks[0].attn.weight.grad = torch.ones(6, 4)
    opt.projected.step()
    assert mem.measure(model, opt).state.proj_bytes == m.state.proj_bytes + 24 * 4


def test_memory_script_tiny_preset(tmp_path):
    """Four methods at the tiny preset; relora is given a key it refuses, so it fails with one line and
    the others are still measured and written (exit status 1)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(MEMORY_SCRIPT),
            "--presets",
            "tiny",
            "--methods",
            "dense,cola,sltrain,relora",
            "--vocab-size",
            "512",
            "--seq-len",
            "8",
            "--set",
            "relora:model.lowrank.density=0.5",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "not measured" in line]
    assert len(errors) == 1 and errors[0].startswith("tiny relora: not measured: ConfigError: "), proc.stderr
    record = json.loads((tmp_path / "memory-tiny.json").read_text())
    rows = record["methods"]
    assert "error" in rows["relora"] and record["machine"]["torch"] == torch.__version__
    dense, cola, sltrain = (rows[k]["measurement"] for k in ("dense", "cola", "sltrain"))
    # Dense AdamW holds two moments per trainable element (+ 4-byte step counters).
    assert dense["state"]["bytes"] >= 2 * dense["trainable"]["bytes"]
    assert dense["grads"]["proj_bytes"] == dense["params"]["proj_bytes"] > 0
    # Low-rank methods have fewer projection parameters, gradients and moments than dense.
    for row in (cola, sltrain):
        assert 0 < row["params"]["proj_bytes"] < dense["params"]["proj_bytes"]
        assert 0 < row["state"]["proj_bytes"] < dense["state"]["proj_bytes"]
    assert sltrain["buffers"]["proj_bytes"] > 0  # the sparse support (int64 index) is live memory too
    text = (tmp_path / "memory-tiny.md").read_text()
    assert "| dense |" in text and "| relora | not measured: ConfigError" in text


# ----------------------------------------------------------------------------------------------
# MEGATRAIN_KERNELS=auto's table (kernels/measured.py) from a results file


def _timing(op, shape, mode, impl, ms):
    return dict(op=op, shape=bench.shape_label(op, shape), shape_params=shape, mode=mode, impl=impl, median_ms=ms)


def test_auto_table_rows_compare_triton_with_the_torch_path():
    from megatrain.kernels import measured

    norm = dict(batch=2, seq=8192, hidden=4096)
    flce = dict(tokens=8192, hidden=4096, vocab=128256)
    cola = dict(tokens=8192, d_in=4096, d_out=4096, rank=1024)
    results = [
        _timing("rms_norm", norm, "fwd+bwd", bench.TRITON, 0.5),
        _timing("rms_norm", norm, "fwd+bwd", bench.EAGER, 2.9),
        _timing("rms_norm", norm, "fwd", bench.TRITON, 0.2),
        _timing("rms_norm", norm, "fwd", bench.EAGER, 0.1),
        # flce: torch-eager is the bf16 unfused form, not the torch path; megatrain-torch is
        _timing("flce", flce, "fwd+bwd", bench.TRITON, 40.0),
        _timing("flce", flce, "fwd+bwd", bench.EAGER, 30.0),
        _timing("flce", flce, "fwd+bwd", bench.TORCH_PATH, 400.0),
        # lowrank from a file without megatrain-torch rows: unmeasured, no row
        _timing("lowrank", cola, "fwd+bwd", bench.TRITON, 1.0),
        _timing("lowrank", cola, "fwd+bwd", bench.EAGER, 0.6),
        _timing("rms_norm", norm, "fwd", "liger", 0.1),
    ]
    report = dict(
        environment=dict(device="NVIDIA H200", date="2026-12-04", git_commit="abc", triton="3.6.0"), results=results
    )
    text = bench.auto_table(report, "benchmarks/results/x.json")
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("Row(")]
    source = '"benchmarks/results/x.json"'
    assert rows == [
        f'Row("rms_norm", "sm_90", "any", "fwd+bwd", TRITON, 0.500, 2.900, "B2 N8192 D4096", {source}),',
        f'Row("rms_norm", "sm_90", "any", "fwd", TORCH, 0.200, 0.100, "B2 N8192 D4096", {source}),',
        'Row("fused_linear_cross_entropy", "sm_90", "V65537-131072", "fwd+bwd", TRITON, 40.000, 400.000, '
        f'"T8192 D4096 V128256", {source}, "megatrain-torch"),',
    ]
    assert "lowrank T8192 D4096x4096 r1024 fwd+bwd: no megatrain-torch row" in text
    # The printed rows are valid table source.
    table = eval("(" + "\n".join(rows) + ")", {"Row": measured.Row, "TRITON": "triton", "TORCH": "torch"})
    assert measured.lookup("fused_linear_cross_entropy", "sm_90", "V65537-131072", "fwd+bwd", table) == "triton"
    with pytest.raises(ValueError, match="compute capability"):
        bench.auto_table(dict(report, environment=dict(device="Some GPU")), "x")


def test_auto_table_command_reads_a_results_file(tmp_path):
    path = tmp_path / "kernels.json"
    norm = dict(batch=2, seq=8192, hidden=4096)
    path.write_text(
        json.dumps(
            dict(
                environment=dict(device="NVIDIA A100-SXM4-80GB", arch="sm_80"),
                results=[
                    _timing("rms_norm", norm, "fwd", bench.TRITON, 0.1),
                    _timing("rms_norm", norm, "fwd", bench.EAGER, 0.3),
                ],
            )
        )
    )
    proc = subprocess.run(
        [sys.executable, str(KERNELS_SCRIPT), "--auto-table", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'Row("rms_norm", "sm_80", "any", "fwd", TRITON, 0.100, 0.300, "B2 N8192 D4096"' in proc.stdout


def test_torch_path_row_runs_the_reference_through_the_dispatcher(monkeypatch):
    """megatrain-torch is the public API under MEGATRAIN_KERNELS=torch (restored after each call), added
    only where torch-eager is not the reference; projected_adam's case checks on CPU against it."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    seen = []
    flce = bench.build_case("flce", dict(tokens=16, hidden=32, vocab=64), {"liger": None, "apex_rms_norm": None})
    flce.impls[bench.TRITON] = lambda *inputs: seen.append(os.environ["MEGATRAIN_KERNELS"])
    bench.with_torch_path(flce).impls[bench.TORCH_PATH](*flce.inputs)
    assert seen == ["torch"] and os.environ["MEGATRAIN_KERNELS"] == "triton"
    norm = bench.with_torch_path(
        bench.build_case("rms_norm", dict(batch=1, seq=4, hidden=8), {"liger": None, "apex_rms_norm": None})
    )
    assert bench.TORCH_PATH not in norm.impls

    case = bench.build_case("projected_adam", dict(rows=40, cols=24, rank=8), {"liger": None})
    assert case.modes == ("step",) and bench.GALORE_TORCH not in case.impls  # galore_torch is not installed here
    checked = bench.check_case(case, rtol=1e-5)  # the Triton kernel in the interpreter vs the reference
    assert [c["tensor"] for c in checked] == ["weight", "exp_avg", "exp_avg_sq"]
    assert all(c["ok"] for c in checked), checked


def test_iha_cpu_cost_script_tiny(tmp_path, monkeypatch):
    """benchmarks/iha_cpu_cost.py end to end at a tiny size: the three rows, their ratios, the files."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", "torch")
    script = REPO / "benchmarks" / "iha_cpu_cost.py"
    spec = importlib.util.spec_from_file_location("megatrain_bench_iha_cpu_cost", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert (
            module.main(
                [
                    "--dim",
                    "32",
                    "--layers",
                    "1",
                    "--heads",
                    "2",
                    "--seq-len",
                    "8",
                    "--batch",
                    "1",
                    "--vocab",
                    "16",
                    "--warmup",
                    "0",
                    "--repeats",
                    "1",
                    "--out",
                    str(tmp_path / "cost"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "cost.json").read_text())
    mha, iha, floor = data["rows"]
    assert mha["time_ratio"] == mha["flop_ratio"] == mha["cost_ratio"] == 1.0
    assert iha["flop_ratio"] > 1.0 and floor["flops_per_step"] == iha["flops_per_step"]
    assert math.isclose(iha["cost_ratio"], iha["time_ratio"] / iha["flop_ratio"])
    assert data["meta"]["kernels"] == "torch" and "| IHA P=2 |" in (tmp_path / "cost.md").read_text()


def test_decode_ops_script_tiny(tmp_path):
    """benchmarks/decode_ops.py end to end at a tiny size: a row per attention kind, the graph step far below
    the eager one, the files."""
    script = REPO / "benchmarks" / "decode_ops.py"
    spec = importlib.util.spec_from_file_location("megatrain_bench_decode_ops", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (
        module.main(
            [
                "--batch",
                "2",
                "--prompt-len",
                "3",
                "--short",
                "2",
                "--steps",
                "2",
                "--vocab",
                "32",
                "--out",
                str(tmp_path / "ops"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "ops.json").read_text())["rows"]
    assert [r["attention"] for r in rows] == ["MHA", "GQA", "IHA P=2"]
    for r in rows:
        assert 0 < r["graph_step"] < 20 < r["static_forward"] < r["eager_step"], r
    assert "| IHA P=2 | 2 |" in (tmp_path / "ops.md").read_text()


def test_layouts_script_plans_each_layout_and_divides_by_one_process():
    """benchmarks/layouts.py without running anything: ZeRO-1 added to each layout, each layout's plan at its
    process count (a pipeline's largest stage), and the rows' ratios to the first layout on synthetic bench
    records; a failed layout keeps its row."""
    script = REPO / "benchmarks" / "layouts.py"
    spec = importlib.util.spec_from_file_location("megatrain_bench_layouts", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tests.conftest import TINY_JOB

    job = [a for a in TINY_JOB if not a.startswith("log.")] + ["model.layers=4"]
    settings = module.layout_settings("base;pp=2;cp=2,zero=2")
    assert [s.overrides[-1] for s in settings] == ["parallel.zero_stage=1"] * 2 + ["parallel.zero_stage=2"]
    plans = {s.label: module.planned(None, job, s, 2 if s.label != "base" else 1) for s in settings}
    assert plans["pp=2"]["layout"] == {"tensor": 1, "pipeline": 2, "context": 1, "data": 1}
    assert len(plans["pp=2"]["stages"]) == 2 and plans["pp=2"]["in_flight"] == 2
    assert plans["cp=2,zero=2"]["activation_bytes"] * 2 == pytest.approx(plans["base"]["activation_bytes"], abs=2)

    def record(label, procs, step):
        return {
            "label": label,
            "procs": procs,
            "tokens_per_step": 256,
            "sides": {
                "megatrain": {
                    "tokens_per_s": 256 / step,
                    "peak_memory_gib_per_rank": [0.5] * procs,
                    "step_memory_gib_per_rank": [0.01] * procs,
                    "first_step_loss": 6.2,
                    "step_times_s": [step],
                }
            },
        }

    result = {
        "settings": [
            record("base", 1, 0.2),
            record("pp=2", 2, 0.3),
            {"label": "cp=2,zero=2", "procs": 2, "error": "boom"},
        ]
    }
    base, pp, cp = module.rows(result, plans)
    assert base["step_ratio"] == base["plan_ratio"] == 1.0
    assert pp["step_ratio"] == pytest.approx(1.5)
    assert pp["plan_ratio"] == pytest.approx(plans["pp=2"]["total_bytes"] / plans["base"]["total_bytes"])
    assert pp["plan_ratio"] < 1.0 and cp["error"] == "boom"


def test_zero_step_script_tiny(tmp_path):
    """benchmarks/zero_step.py end to end at the tiny preset (its own process: it starts a process group): per
    stage and dtype the lean step dispatches fewer ops than DeepSpeed's stock one and ends at the same weights."""
    env = {**child_env(), "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "zero_step.py"), "--preset", "tiny", "--steps", "1"]
        + ["--out", str(tmp_path / "zero")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "zero.json").read_text())["rows"]
    assert [(r["dtype"], r["zero"]) for r in rows] == [
        ("bf16", 0),
        ("bf16", 1),
        ("bf16", 2),
        ("fp32", 1),
        ("fp32", 2),
    ]
    for r in rows:
        # ZeRO 0: DeepSpeed's norm is fp32 and the lean one fp64, which may move the clip in the last bits
        assert r["max_weight_diff"] == 0.0 if r["zero"] else r["max_weight_diff"] < 1e-2, r
        assert r["lean"]["aten_ops"] < r["stock"]["aten_ops"], r
        assert r["lean"]["host_reads"] == 1 < r["stock"]["host_reads"], r  # the skip decision only
        assert r["stock"]["tensors"] == r["lean"]["tensors"] > 0
    stage0, bf16 = rows[0], rows[1]
    assert bf16["lean"]["aten_ops"] < 0.6 * bf16["stock"]["aten_ops"]  # the per-gradient scan is gone
    assert stage0["stock"]["host_reads"] > stage0["stock"]["tensors"]  # DeepSpeed reads every gradient
    assert "| bf16 | 1 |" in (tmp_path / "zero.md").read_text()


def test_op_overhead_script_tiny(tmp_path):
    """benchmarks/op_overhead.py end to end with few calls: a row per forward kernel op, both paths timed, both
    modes, and the kernels' real implementations back in place afterwards."""
    script = REPO / "benchmarks" / "op_overhead.py"
    spec = importlib.util.spec_from_file_location("megatrain_bench_op_overhead", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--calls", "20", "--repeats", "1", "--out", str(tmp_path / "ovh")]) == 0
    rows = json.loads((tmp_path / "ovh.json").read_text())["rows"]
    assert [r["op"] for r in rows] == list(module.samples())
    for r in rows:
        assert all(r[k] > 0 for k in ("op_grad_us", "fast_grad_us", "op_nograd_us", "fast_nograd_us")), r
    for kernel, _ in module.samples().values():
        assert kernel._fn is not kernel.op._abstract_fn and kernel.op._backend_fns[None] is not kernel.op._abstract_fn
    assert "| rms_norm |" in (tmp_path / "ovh.md").read_text()
