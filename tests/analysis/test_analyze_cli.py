"""`megatrain analyze` end to end on the session's tiny run, and log.analyze_every (in-process and under TP=2)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatrain.analysis.analyze import spectra_of
from megatrain.analysis.exposure import TrainingOrder
from megatrain.analysis.weights import CheckpointWeights, initial_weights, run_config
from megatrain.cli import main
from tests.conftest import TINY_JOB, read_metrics, run_cli


@pytest.fixture(scope="module")
def analysed(tiny_run, tmp_path_factory):
    """`megatrain analyze` of the session's tiny run (checkpoints at steps 4 and 8) at step 8 against its
    own step 4, with a phrase from the batch of step 3 and one never trained on."""
    from megatrain.data import open_data

    run_dir = tiny_run
    root = tmp_path_factory.mktemp("analyze")
    cfg = run_config(str(run_dir))
    data = open_data(cfg)
    block = TrainingOrder(len(data.train), cfg.train.global_batch, cfg.train.seed).blocks_of_step(3)[0]
    tokens = data.train[block].tolist()
    phrase = None
    for start in range(0, len(tokens) - 12):  # a window whose text encodes back to the same ids
        text = data.tokenizer.decode(tokens[start : start + 12])
        if "\n" not in text and data.tokenizer.encode(text) == tokens[start : start + 12]:
            phrase = text
            break
    assert phrase is not None
    phrases = root / "phrases.txt"
    phrases.write_text(f"{phrase}\nzebra quantum marmalade xylophone cathedral\n")
    out = root / "out"
    proc = run_cli(
        [
            "analyze",
            str(run_dir),
            "--vs",
            str(run_dir),
            "--vs-checkpoint",
            "4",
            "--points",
            "7",
            "--directions",
            "1",
            "--components",
            "1",
            "--interp-points",
            "5",
            "--batches",
            "1",
            "--phrases",
            str(phrases),
            "--out",
            str(out),
        ]
    )
    assert proc.stdout.strip() == f"wrote {out / 'report.md'}"
    return run_dir, out, json.loads((out / "analysis.json").read_text())


def test_report_files(analysed):
    _, out, results = analysed
    for name in (
        "report.md",
        "spectra.npz",
        "spectra_ranks.png",
        "spectra_values.png",
        "landscape.png",
        "interpolation.png",
        "cka.png",
    ):
        assert os.path.getsize(out / name) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    report = (out / "report.md").read_text()
    for heading in ("## Spectra", "## Loss landscape", "## Interpolation", "## Representations", "## Exposure"):
        assert heading in report
    assert results["step"] == 8 and results["spectra"][1]["step"] == 4


def test_spectra_updates_are_measured_from_the_rebuilt_init(analysed):
    run_dir, _, results = analysed
    rows = results["spectra"][0]["rows"]
    assert len(rows) == 2 * 7 + 2  # seven projections per block, the embedding and the head
    # a few small steps from the true W_0 stay well below the weights' own norm; from another seed's
    # init the difference of two independent draws is ~sqrt(2) times the weights
    assert all(0 < r["update_relative_norm"] < 0.9 for r in rows)
    weights = CheckpointWeights(str(run_dir / "checkpoints" / "step_8"))
    assert weights.dtypes["embed.weight"] == torch.float32  # what W_0 is rounded to (bf16 runs: bf16)
    wrong, _ = spectra_of(weights, initial_weights({**weights.meta, "seed": weights.meta["seed"] + 1}), 32.0)
    assert all(r["update_relative_norm"] > 1.1 for r in wrong if r["kind"] != "embed")


def test_update_spectra_instrument_on_a_planted_update():
    """The callable log.analyze_every runs, on a model whose attn.q projections moved by a rank-1 update
    and nothing else: effective and stable rank 1 there, 0 (no update) elsewhere."""
    from types import SimpleNamespace

    from megatrain.analysis.live import UpdateSpectra
    from megatrain.analysis.weights import build_model
    from megatrain.models.config import ModelConfig

    model_cfg = ModelConfig(preset="tiny", vocab_size=96, max_seq_len=64).resolved()
    model = build_model(model_cfg, seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.q_proj.weight
            w += 0.3 * torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g)
    trainer = SimpleNamespace(
        engine=SimpleNamespace(module=model),
        groups=None,
        model_cfg=model_cfg,
        env=SimpleNamespace(is_main=True),
        cfg=SimpleNamespace(train=SimpleNamespace(seed=5), parallel=SimpleNamespace(zero_stage=0)),
    )
    metrics = UpdateSpectra()(trainer)
    # fp32 weights: W_t - W_0 carries rounding at ~1e-7 of the update besides the planted direction
    assert metrics["analysis/update_effective_rank/attn.q"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["analysis/update_stable_rank/attn.q"] == pytest.approx(1.0, abs=1e-6)
    assert (
        metrics["analysis/update_effective_rank/mlp.up"] == 0.0 and metrics["analysis/update_relative_norm/head"] == 0.0
    )
    assert len(metrics) == 3 * 9
    # a bf16 model that has not moved: W_0 is rounded like it, so no update at all (not the init's rounding)
    untouched = build_model(model_cfg, seed=5).to(torch.bfloat16)
    trainer.engine.module = untouched
    metrics = UpdateSpectra()(trainer)
    assert all(metrics[f"analysis/update_relative_norm/{kind}"] == 0.0 for kind in ("embed", "attn.q", "head"))


def test_landscape_interpolation_cka(analysed):
    _, _, results = analysed
    curves = results["landscape"]["curves"]
    assert [c["kind"] for c in curves] == ["random", "pca"]
    assert curves[1]["explained_variance"] == pytest.approx(1.0)  # one earlier checkpoint: one direction
    loss_at_8 = curves[0]["sharpness"]["loss_at_0"]
    assert curves[0]["losses"][3] == pytest.approx(loss_at_8) and curves[1]["losses"][3] == pytest.approx(loss_at_8)
    # a filter-normalised move as large as the weights changes the loss (the curve measures something;
    # 8 steps from init are no minimum, so its sign is not fixed)
    assert max(abs(curves[0]["losses"][0] - loss_at_8), abs(curves[0]["losses"][-1] - loss_at_8)) > 0.01
    interp = results["interpolation"]
    assert (interp["a_step"], interp["b_step"]) == (8, 4) and interp["same_init"]
    assert interp["losses"][0] == pytest.approx(loss_at_8) and interp["barrier"] >= 0
    cka = results["cka"]
    assert len(cka["per_layer"]) == 3 and all(0 < v <= 1 + 1e-9 for v in cka["per_layer"])


def test_exposure_of_a_trained_phrase(analysed):
    _, _, results = analysed
    run, other = results["exposure"]
    seen, unseen = run["items"]
    assert seen["seen"] and seen["first_step"] <= 3 and seen["count"] >= 1
    assert not unseen["seen"] and run["seen"] == 1 and run["unseen"] == 1
    assert other["step"] == 4 and other["items"][0]["seen"]  # --vs step_4: already seen by step 3


def test_bad_arguments_are_one_line(analysed, tmp_path, capsys):
    run_dir, _, _ = analysed
    assert main(["analyze", str(run_dir), "--only", "spectra,bogus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatrain: error: --only") and err.count("\n") == 1 and not (tmp_path / "x").exists()
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "not a megatrain run" in capsys.readouterr().err
    assert main(["analyze", str(run_dir), "--checkpoint", "5"]) == 2
    assert "step_4, step_8" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_every_under_tensor_parallelism_logs_what_analyze_reports(analysed, tmp_path):
    """log.analyze_every in a TP=2 run (two gloo processes; each matrix joined from its slices) logs at
    step 4 the ranks `megatrain analyze` reports for the single-process run's step 4 (same seed, same
    data), and nothing on the other steps."""
    _, _, results = analysed
    tp_dir = tmp_path / "tp2"
    run_cli(
        [
            "pretrain",
            *TINY_JOB,
            "log.eval_every=0",
            "parallel.zero_stage=1",
            "parallel.tensor=2",
            "--nproc-per-node",
            "2",
            "train.stop_after=4",
            "log.analyze_every=4",
            f"run.dir={tp_dir}",
        ]
    )
    logged = {r["step"]: r for r in read_metrics(tp_dir)}
    assert not any(k.startswith("analysis/") for k in logged[3])
    step4 = results["spectra"][1]
    assert step4["step"] == 4
    keys = [k for k in logged[4] if k.startswith("analysis/")]
    assert len(keys) == 3 * 9
    for key in keys:
        _, metric, kind = key.split("/")
        assert logged[4][key] == pytest.approx(step4["kind_means"][metric][kind], rel=1e-4), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tp_dir / "tb"))
    events.Reload()
    [point] = events.Scalars("analysis/update_effective_rank/attn.q")
    assert point.step == 4 and point.value == pytest.approx(logged[4]["analysis/update_effective_rank/attn.q"])


def test_comparisons_need_the_same_tokenizer(tmp_path):
    from megatrain.analysis.weights import same_tokenizer
    from megatrain.errors import ConfigError

    a, b = tmp_path / "a", tmp_path / "b"
    for folder, data in ((a, b"one"), (b, b"two")):
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(data)
    with pytest.raises(ConfigError, match="different tokenizers"):
        same_tokenizer(str(a), str(b), "--vs")
    same_tokenizer(str(a), str(a), "--vs")


def test_analyze_every_key_checks(tmp_path):
    from megatrain.config import load_config
    from megatrain.engine.trainer import pretrain
    from megatrain.errors import ConfigError

    with pytest.raises(ConfigError, match="log.analyze_every must be >= 0"):
        load_config(None, ["log.analyze_every=-1"])
    # pretrain() called from a script without the instruments: one line before anything starts
    cfg = load_config(None, [*TINY_JOB, "log.analyze_every=2", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="training_instruments"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()


def test_comparison_of_different_kinds_skips_interpolation_only(analysed, tmp_path):
    """dense vs another projection kind: no straight line between their weights (a note in the report),
    while CKA compares their hidden states."""
    import shutil

    from megatrain.analysis.analyze import AnalyzeOptions, analyze

    run_dir, _, _ = analysed
    other = tmp_path / "other"
    shutil.copytree(run_dir / "checkpoints" / "step_4", other)
    meta = json.loads((other / "megatrain.json").read_text())
    meta["model"]["linear"] = "cola"  # what the interpolation checks first; the weights are never read
    (other / "megatrain.json").write_text(json.dumps(meta))
    results = analyze(str(run_dir), str(other), AnalyzeOptions(only=("interpolation",), batches=1, micro_batch=2))
    assert "model.linear ('dense' vs 'cola')" in results["interpolation"]["note"]
