"""`megatrain bench`: the MFU arithmetic, the settings, the HF baseline's parity with the megatrain model,
and tiny end-to-end runs with and without transformers (timings are never checked, only the report)."""

from __future__ import annotations

import importlib.util
import json
import re
import os
import subprocess
import sys

import pytest
import torch

from megatrain.bench.settings import parse_setting, parse_settings
from megatrain.engine.metrics import device_peak_flops, mfu
from megatrain.errors import ConfigError
from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer

from tests.conftest import REPO, TINY_JOB, child_env

BENCH_JOB = [a for a in TINY_JOB if not a.startswith(("train.steps", "log."))]


def test_bench_processes_get_the_users_config_and_overrides(monkeypatch, tmp_path, capsys):
    """`megatrain bench FILE a=b ... --settings procs=2,zero=1`: the spec a 2-process setting hands its workers
    holds the user's YAML and overrides, in order, and the config every worker builds from it
    (megatrain.bench.worker.worker_config) is that YAML with those overrides, then the setting's. The
    processes are not started here (the spec is caught where it would be written for torchrun)."""
    import megatrain.bench.run as bench_run
    from megatrain import cli
    from megatrain.bench.worker import worker_config
    from megatrain.config import load_config

    seen = []

    def caught(spec, setting, procs, scratch):
        spec = json.loads(json.dumps(spec))  # what the workers read back from spec.json
        seen.append((procs, spec, worker_config(spec)))
        return {"error": "not started in this test"}

    monkeypatch.setattr(bench_run, "_run_in_processes", caught)
    path = str(REPO / "launch/configs/tiny-cpu.yaml")
    overrides = ["model.preset=tiny", "data.seq_len=32", "data.vocab_size=512", "train.lr=1e-3", "train.micro_batch=2"]
    assert (
        cli.main(
            [
                "bench",
                path,
                *overrides,
                "--settings",
                "procs=2,zero=1",
                "--no-baseline",
                "--no-plain",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "every setting failed: procs=2,zero=1: not started in this test" in capsys.readouterr().err
    ((procs, spec, cfg),) = seen
    assert procs == 2 and spec["config"] == path and spec["overrides"] == overrides
    expected = load_config(
        path,
        [
            *overrides,
            "parallel.zero_stage=1",
            f"run.dir={spec['run_dir']}",
            "log.progress=false",
            "log.tensorboard=false",
        ],
    )
    assert cfg.to_dict() == expected.to_dict()
    assert (cfg.model.preset, cfg.data.seq_len, cfg.train.micro_batch, cfg.parallel.zero_stage) == ("tiny", 32, 2, 1)


def test_mfu_against_a_hand_computed_example(monkeypatch):
    # dim 64, 2 layers, 4 heads of 16 (2 KV heads), SwiGLU 176, vocabulary 512, untied head.
    model = Transformer(ModelConfig(dim=64, layers=2, heads=4, kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=64))
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 176) + 2 * 64  # q, k+v, o, gate+up+down, 2 norms
    non_embedding = 2 * per_layer + 64 + 512 * 64  # + final norm + head = 125,248
    assert non_embedding == 125_248 == model.num_params(non_embedding=True)
    flops = 6 * 125_248 + 12 * 2 * 4 * 16 * 32  # 751,488 + 49,152 at T = 32
    assert model.flops_per_token(32) == flops == 800_640
    # 10,000 tokens/s on 2 devices of 1 TFLOP/s each: 8.0064e9 / 2e12.
    assert mfu(10_000, flops, 2, 1e12) == pytest.approx(0.0040032, rel=1e-12)
    assert mfu(10_000, flops, 2, None) is None
    monkeypatch.setenv("MEGATRAIN_PEAK_FLOPS", "2.5e12")
    assert device_peak_flops(torch.device("cpu")) == 2.5e12


def test_settings_parse_short_keys_full_keys_and_run_options():
    s = parse_setting("mb=4,zero=2,ac=1,compile=off,tp=2,sp=yes,kernels=torch,procs=4,train.dtype=bf16")
    assert s.overrides == [
        "train.micro_batch=4",
        "parallel.zero_stage=2",
        "train.activation_checkpointing=true",
        "train.compile=false",
        "parallel.tensor=2",
        "parallel.sequence=true",
        "train.dtype=bf16",
    ]
    assert (s.kernels, s.procs, s.process_count(2)) == ("torch", 4, 4)
    assert parse_setting("tp=2").process_count(2) == 2  # TP=T x DP=1 by default
    assert parse_setting("pp=2,cp=2").overrides == ["parallel.pipeline=2", "parallel.context=2"]
    assert parse_setting("pp=2").process_count(2, 2) == 4  # TP x PP x C, DP=1
    assert parse_setting("procs=8").process_count(1, 2, 2) == 8
    with pytest.raises(ConfigError, match="procs=6 is not a multiple of parallel.tensor=1 x parallel.pipeline=2 x"):
        parse_setting("procs=6").process_count(1, 2, 4)
    assert [x.label for x in parse_settings(["mb=4;mb=8", "zero=3"])] == ["mb=4", "mb=8", "zero=3"]
    assert [x.label for x in parse_settings(None)] == ["base"]
    for bad, word in (
        ("batch=4", "unknown key 'batch'"),
        ("mb", "not key=value"),
        ("kernels=cuda", "kernels=cuda"),
        ("procs=0", "procs=0"),
    ):
        with pytest.raises(ConfigError, match=word):
            parse_setting(bad)
    with pytest.raises(ConfigError, match="more than once"):
        parse_settings(["mb=4", "mb=4"])
    with pytest.raises(ConfigError, match="not a multiple"):
        parse_setting("procs=3").process_count(2)


def test_bad_setting_fails_in_one_line_before_any_timing(tmp_path):
    from megatrain.bench import run_bench

    with pytest.raises(ConfigError, match="setting 'mb=3': train.global_batch=8 is not a multiple"):
        run_bench(None, BENCH_JOB, parse_settings(["mb=4", "mb=3"]), out_dir=str(tmp_path), echo=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tie", [False, True])
def test_hf_baseline_is_the_same_model(tie):
    """LlamaForCausalLM built from megatrain's weights: the same logits and the same loss (fp32)."""
    pytest.importorskip("transformers")
    from megatrain.bench.baseline import hf_llama_from

    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=512, max_seq_len=64, tie_embeddings=tie)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.mlp_norm.weight.uniform_(0.5, 1.5)
    hf = hf_llama_from(model)
    assert hf.config.tie_word_embeddings is tie and not hf.training
    x, y = torch.randint(0, 512, (3, 40)), torch.randint(0, 512, (3, 40))
    y[0, :5] = -100
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss, model(x, labels=y), rtol=1e-6, atol=1e-6
        )
    hf.model.embed_tokens.weight.data.zero_()  # copies, not views: the megatrain model is untouched
    assert model.embed.weight.abs().sum() > 0


def test_hf_baseline_refuses_models_llama_cannot_hold():
    from megatrain.bench.baseline import baseline_unsupported

    assert "model.linear=cola" in baseline_unsupported(ModelConfig(preset="tiny", linear="cola").resolved())
    assert "model.attention=iha" in baseline_unsupported(ModelConfig(preset="tiny", attention="iha").resolved())
    assert baseline_unsupported(ModelConfig(preset="tiny").resolved()) is None


# train.compile=true goes through DeepSpeed's engine.compile (and nn.Module.compile for the plain loop) with
# the default inductor backend, whose C++ build takes minutes on CPU; the test traces with dynamo's "eager"
# backend instead, which checks that every side really compiles without building code.
EAGER_COMPILE = (
    "import torch, deepspeed.runtime.engine as E; ds = E.DeepSpeedEngine.compile; "
    "E.DeepSpeedEngine.compile = lambda self, *a, **k: ds(self, backend='eager'); "
    "mc = torch.nn.Module.compile; torch.nn.Module.compile = lambda self, *a, **k: mc(self, backend='eager'); "
)


def _bench(tmp_path, *args, hide_transformers=False, peak=None, eager_compile=False, warmup=1):
    out = tmp_path / "results"
    code = f"import sys; {EAGER_COMPILE if eager_compile else ''}from megatrain.cli import entry; entry()"
    env = child_env()
    if hide_transformers:
        # A package first on the path whose import fails as if transformers were absent. (A None entry in
        # sys.modules would break datasets, which pickles with dill and imports whatever sys.modules names.)
        shadow = tmp_path / "no-transformers" / "transformers"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\")\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), *filter(None, [env.get("PYTHONPATH")])])
    if peak is not None:
        env["MEGATRAIN_PEAK_FLOPS"] = str(peak)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "bench",
            *BENCH_JOB,
            *args,
            "--steps",
            "2",
            "--warmup",
            str(warmup),
            "--block",
            "1",
            "--breakdown-steps",
            "1",
            "--out",
            str(out),
            "--tag",
            "t",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out / "t.json") as fh:
        info = json.load(fh)
    return info, (out / "t.md").read_text(), proc.stdout, out


@pytest.mark.slow  # ~15 s: a fresh interpreter imports torch, deepspeed and transformers
def test_bench_run_with_transformers_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("transformers")
    info, table, stdout, out = _bench(
        tmp_path,
        "--settings",
        "zero=1,ac=1",
        "mb=2,zero=0,compile=1",
        "--plot",
        peak=1e12,
        eager_compile=True,
        warmup=2,  # host reads are counted in the warm-up steps after the first
    )
    assert [s["label"] for s in info["settings"]] == ["zero=1,ac=1", "mb=2,zero=0,compile=1"]
    for s in info["settings"]:
        sides = s["sides"]
        assert set(sides) == {"megatrain", "hf_deepspeed", "plain"} and not s["skipped"]
        # Same initial weights and the same first batch: the same loss in all three (fp32).
        losses = [side["first_step_loss"] for side in sides.values()]
        assert max(losses) - min(losses) < 1e-4, losses
        ours = sides["megatrain"]
        assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * s["flops_per_token"] / 1e12)
        assert s["ratios"]["megatrain_over_hf_deepspeed"] == pytest.approx(
            ours["tokens_per_s"] / sides["hf_deepspeed"]["tokens_per_s"]
        )
        assert s["ratios"]["megatrain_over_hf_deepspeed_best_step"] == pytest.approx(
            min(sides["hf_deepspeed"]["step_times_s"]) / min(ours["step_times_s"])
        )
        assert set(ours["breakdown_s"]) == {"step", "forward", "backward", "optimizer", "communication"}
        assert ours["breakdown_s"]["forward"] > 0 and len(ours["peak_memory_gib_per_rank"]) == 1
        for side in sides.values():  # host work per step, counted on CPU (no device kernels there)
            d = side["dispatch"]
            assert d["aten_ops"] > 50 and d["host_cpu_s"] > 0 and d["device_kernels"] is None, d
        assert s["ratios"]["aten_ops_megatrain_over_hf_deepspeed"] == pytest.approx(
            ours["dispatch"]["aten_ops"] / sides["hf_deepspeed"]["dispatch"]["aten_ops"]
        )
    first, second = info["settings"]
    # Host reads: counted without compile (a function mode would be traced), by the code that read.
    assert all(side["dispatch"]["host_reads"] is None for side in second["sides"].values())
    ours, hf = first["sides"]["megatrain"]["dispatch"], first["sides"]["hf_deepspeed"]["dispatch"]
    assert ours["host_reads"] == sum(ours["host_reads_by_site"].values()) > 0, ours
    # ZeRO-1 in fp32: DeepSpeed's stock step (the HF side) reads the norm and the clip factor per parameter
    # group; megatrain's lean step reads the norm once.
    in_deepspeed = [
        sum(n for site, n in d["host_reads_by_site"].items() if site.startswith("deepspeed/")) for d in (ours, hf)
    ]
    assert in_deepspeed[0] == 1 < in_deepspeed[1], (ours, hf)
    assert (first["zero_stage"], first["activation_checkpointing"], first["compile"]) == (1, True, False)
    assert (second["micro_batch"], second["grad_accum"], second["zero_stage"], second["compile"]) == (2, 4, 0, True)
    assert [side["compiled"] for side in first["sides"].values()] == [False] * 3
    assert [side["compiled"] for side in second["sides"].values()] == [True] * 3
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", info["versions"]["commit"] or "")  # the tests run in a checkout
    assert info["versions"]["transformers"] and info["device"] and info["base_config"]["data"]["seq_len"] == 32
    assert "| zero=1,ac=1 | 1 | 1 |" in table and "megatrain / HF+DS" in table and "Time per step by phase" in table
    assert "Host work per step" in table and "| zero=1,ac=1 | HF+DeepSpeed |" in table and "host reads" in table
    assert "Where the host reads, per step" in table and "- zero=1,ac=1, megatrain: `" in table
    assert "| zero=1,ac=1 | 1 | 1 |" in stdout  # the console table
    assert (out / "t.png").stat().st_size > 1000


@pytest.mark.slow  # ~25 s: two pipeline stages under torchrun
def test_bench_times_a_pipelined_setting_by_phase(tmp_path):
    """`--settings pp=2`: two processes (one per stage), the 1F1B schedule's forward / backward / optimizer
    instructions timed as the phases, the tokens of one global batch per step, no baseline column."""
    info, table, _, _ = _bench(tmp_path, "--settings", "pp=2,zero=1", "--no-plain")
    (s,) = info["settings"]
    assert s.get("error") is None, s
    assert s["procs"] == 2 and s["tokens_per_step"] == 8 * 32
    ours = s["sides"]["megatrain"]
    phases = ours["breakdown_s"]
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0, phases
    assert phases["step"] >= phases["forward"] + phases["backward"] + phases["optimizer"]
    assert len(ours["peak_memory_gib_per_rank"]) == 2
    assert "pipeline or context parallelism" in s["skipped"]["hf_deepspeed"]
    assert "| pp=2,zero=1 | 2 | 1 |" in table


@pytest.mark.slow  # ~10 s: a fresh interpreter
def test_bench_run_without_transformers_skips_the_hf_column(tmp_path):
    info, table, _, out = _bench(tmp_path, "--clock", "cpu", "--threads", "1", hide_transformers=True)
    (s,) = info["settings"]
    assert (s["clock"], s["threads"]) == ("cpu", 1) and "Steps timed by CPU time" in table
    assert set(s["sides"]) == {"megatrain", "plain"}
    assert s["kernel_paths"]["rms_norm"] == "torch" and s["kernel_paths"]["fused_linear_cross_entropy"] == "torch"
    assert "megatrain's kernels (MEGATRAIN_KERNELS=auto): " in table
    assert "transformers is not installed" in s["skipped"]["hf_deepspeed"]
    assert "megatrain_over_hf_deepspeed" not in s["ratios"] and s["ratios"]["megatrain_over_plain"] > 0
    assert info["versions"]["transformers"] is None and s["sides"]["megatrain"]["mfu"] is None
    assert "transformers is not installed" in table and "| base | 1 |" in table
    assert not (out / "t.png").exists()


def test_throughput_script_maps_its_flags_to_bench():
    spec = importlib.util.spec_from_file_location("throughput_script", REPO / "benchmarks" / "throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(
        [
            "--preset",
            "tiny",
            "--seq-len",
            "64",
            "--tp",
            "1,2",
            "--sequence-parallel",
            "--zero-stage",
            "1",
            "--activation-checkpointing",
            "--profile",
            "2",
        ]
    )
    assert script.bench_settings(args) == ["tp=1", "tp=2,sp=1"]
    overrides = script.bench_overrides(args)
    assert {
        "model.preset=tiny",
        "data.seq_len=64",
        "parallel.zero_stage=1",
        "train.activation_checkpointing=true",
    } <= set(overrides)
    assert script.bench_settings(script.parse_args([])) == []


def test_report_of_a_partial_run_with_a_failed_setting_and_tp(tmp_path):
    """A long benchmark writes what it has after each setting; a failed setting is a row, TP gets its plan."""
    from megatrain.bench.report import render_markdown, write_results

    side = {
        "median_step_s": 0.5,
        "tokens_per_s": 2048.0,
        "mfu": None,
        "peak_memory_gib_per_rank": [1.0, 1.25],
        "step_memory_gib_per_rank": [0.25, 0.5],
        "breakdown_s": {"step": 0.6, "forward": 0.1, "backward": 0.2, "optimizer": 0.05, "communication": 0.02},
        "first_step_loss": 6.0,
        "step_times_s": [0.5],
        "compiled": False,
    }
    ok = {
        "label": "tp=2",
        "world_size": 2,
        "zero_stage": 1,
        "seq_len": 128,
        "global_batch": 8,
        "tokens_per_step": 1024,
        "dtype": "fp32",
        "measured_steps": 1,
        "warmup_steps": 1,
        "block": 1,
        "memory": "peak RSS",
        "sides": {"megatrain": side},
        "ratios": {},
        "skipped": {"hf_deepspeed": "no TP in the baseline"},
        "tp_comm": {"per_layer": 2**20, "embedding_and_head": 2**19, "loss": 2**18, "per_step": 5 * 2**20},
        "profiles": {"megatrain": "op table"},
        "kernels": "auto",
        "kernel_paths": {"fused_linear_cross_entropy": "torch", "rms_norm": "triton"},
    }
    result = {
        "config_name": "x.yaml",
        "device": "CPU",
        "command": "megatrain bench x.yaml",
        "settings_planned": 3,
        "versions": {"torch": "2", "transformers": None},
        "model": {"description": "tiny", "params": 10**6, "flops_per_token": 6 * 10**6},
        "settings": [ok, {"label": "zero=3", "procs": 2, "error": "the 2-process run exited 1: boom"}],
    }
    write_results(result, str(tmp_path), "p")
    table = (tmp_path / "p.md").read_text()
    assert "**Partial: 2 of 3 settings measured so far.**" in table
    assert "| tp=2 | 2 | 1 | 2,048 | n/a | **n/a** | n/a |" in table and "1.00 (0.25), 1.25 (0.50)" in table
    assert "| zero=3 | 2 | | failed: the 2-process run exited 1: boom |" in table
    assert "| tp=2 | 1.00 | 0.50 | 0.25 | 5.00 |" in table  # the computed TP plan, MiB
    assert "| tp=2 | megatrain | 500.0 | 600.0 | 100.0 | 200.0 | 50.0 | 20.0 | 250.0 |" in table  # other = 600-350
    assert "no HF+DeepSpeed column: no TP in the baseline" in table and "transformers not installed" in table
    assert (
        "- tp=2: megatrain's kernels (MEGATRAIN_KERNELS=auto): fused_linear_cross_entropy torch, rms_norm triton"
        in table
    )
    assert (tmp_path / "p-profile-0-megatrain.txt").read_text().endswith("op table")
    assert json.loads((tmp_path / "p.json").read_text())["profile_files"] == {
        "tp=2/megatrain": "p-profile-0-megatrain.txt"
    }
    assert "profiles" not in ok and render_markdown(result) == table


def test_kernel_paths_line_names_every_op_and_the_device():
    from megatrain.engine.metrics import kernel_paths_line

    line = kernel_paths_line({"rms_norm": "torch", "swiglu": "triton+torch"}, "auto", torch.device("cpu"))
    assert line == "kernels (MEGATRAIN_KERNELS=auto, cpu): rms_norm torch, swiglu triton+torch"
    assert kernel_paths_line({}, "torch", torch.device("cpu")).endswith("none called")
