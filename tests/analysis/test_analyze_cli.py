"""`megatrain analyze` end to end on a tiny run, and log.analyze_every during its training."""

from __future__ import annotations

import json
import os

import pytest

from megatrain.analysis.analyze import spectra_of
from megatrain.analysis.exposure import TrainingOrder
from megatrain.analysis.weights import CheckpointWeights, initial_weights, run_config
from megatrain.cli import main
from tests.conftest import TINY_JOB, read_metrics, run_cli


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A tiny run (checkpoints at steps 4 and 8, log.analyze_every=4) and `megatrain analyze` of its step 8
    against its step 4, with a phrase from the batch of step 3 and one never trained on."""
    root = tmp_path_factory.mktemp("analyze")
    run_dir = root / "run"
    run_cli(["pretrain", *TINY_JOB, "log.eval_every=0", "parallel.zero_stage=0", "checkpoint.every=4",
             "log.analyze_every=4", f"run.dir={run_dir}"])
    from megatrain.data import open_data

    cfg = run_config(str(run_dir))
    data = open_data(cfg)
    block = TrainingOrder(len(data.train), cfg.train.global_batch, cfg.train.seed).blocks_of_step(3)[0]
    tokens = data.train[block].tolist()
    phrase = None
    for start in range(0, len(tokens) - 12):  # a window whose text encodes back to the same ids
        text = data.tokenizer.decode(tokens[start:start + 12])
        if "\n" not in text and data.tokenizer.encode(text) == tokens[start:start + 12]:
            phrase = text
            break
    assert phrase is not None
    phrases = root / "phrases.txt"
    phrases.write_text(f"{phrase}\nzebra quantum marmalade xylophone cathedral\n")
    out = root / "out"
    proc = run_cli(["analyze", str(run_dir), "--vs", str(run_dir), "--vs-checkpoint", "4", "--points", "7",
                    "--directions", "1", "--components", "1", "--interp-points", "5", "--batches", "1",
                    "--phrases", str(phrases), "--out", str(out)])
    assert proc.stdout.strip() == f"wrote {out / 'report.md'}"
    return run_dir, out, json.loads((out / "analysis.json").read_text())


def test_report_files(analysed):
    _, out, results = analysed
    for name in ("report.md", "spectra.npz", "spectra_ranks.png", "spectra_values.png", "landscape.png",
                 "interpolation.png", "cka.png"):
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
    wrong, _ = spectra_of(weights, initial_weights({**weights.meta, "seed": weights.meta["seed"] + 1}), 32.0)
    assert all(r["update_relative_norm"] > 1.1 for r in wrong if r["kind"] != "embed")


def test_analyze_every_logs_what_analyze_reports(analysed):
    run_dir, _, results = analysed
    logged = {r["step"]: r for r in read_metrics(run_dir)}
    assert "analysis/update_effective_rank/attn.q" in logged[4]
    assert "analysis/update_effective_rank/attn.q" not in logged[3]
    means = results["spectra"][0]["kind_means"]
    for kind in ("attn.q", "mlp.down", "head"):
        assert logged[8][f"analysis/update_effective_rank/{kind}"] == pytest.approx(
            means["update_effective_rank"][kind], rel=1e-6)
        assert logged[8][f"analysis/update_stable_rank/{kind}"] == pytest.approx(
            means["update_stable_rank"][kind], rel=1e-6)


def test_landscape_interpolation_cka(analysed):
    _, _, results = analysed
    curves = results["landscape"]["curves"]
    assert [c["kind"] for c in curves] == ["random", "pca"]
    assert curves[1]["explained_variance"] == pytest.approx(1.0)  # one earlier checkpoint: one direction
    loss_at_8 = curves[0]["sharpness"]["loss_at_0"]
    assert curves[0]["losses"][3] == pytest.approx(loss_at_8) and curves[1]["losses"][3] == pytest.approx(loss_at_8)
    # a filter-normalised move as large as the weights costs loss
    assert min(curves[0]["losses"][0], curves[0]["losses"][-1]) > loss_at_8
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
def test_analyze_every_under_tensor_parallelism_joins_the_slices(analysed, tmp_path):
    """TP=2 (two gloo processes): each matrix is joined from its slices before its spectrum, so the
    logged ranks equal the single-process run's (same seed, same data)."""
    run_dir, _, _ = analysed
    tp_dir = tmp_path / "tp2"
    run_cli(["pretrain", *TINY_JOB, "log.eval_every=0", "parallel.zero_stage=1", "parallel.tensor=2",
             "--nproc-per-node", "2", "train.stop_after=4", "log.analyze_every=4", f"run.dir={tp_dir}"])
    single, tp = read_metrics(run_dir)[3], read_metrics(tp_dir)[3]
    keys = [k for k in single if k.startswith("analysis/")]
    assert len(keys) == 3 * 9 and tp["step"] == single["step"] == 4
    for key in keys:
        assert tp[key] == pytest.approx(single[key], rel=1e-4), key


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
