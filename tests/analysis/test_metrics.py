"""The analysis metrics against hand-built cases with known answers (no run needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatrain.analysis import effective_rank, linear_cka, stable_rank, top_k_energy
from megatrain.analysis.landscape import (
    RandomDirection,
    TrajectoryPCA,
    barrier_height,
    filter_dim,
    filter_normalize,
    interpolation_curve,
    loss_curve,
    sharpness,
)
from megatrain.analysis.spectra import model_matrices, singular_values
from megatrain.analysis.weights import Batches, ModuleWeights, build_model, mean_loss
from megatrain.models.config import ModelConfig
from megatrain.models.layers import CoLALinear, LoRALinear, SLTrainLinear


def _orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_planted_rank_r_update_has_rank_r(rank):
    g = torch.Generator().manual_seed(rank)
    values = torch.linspace(3.0, 2.0, rank, dtype=torch.float64)  # close, not equal: near r, not exactly r
    u, v = _orthonormal(96, rank, g), _orthonormal(80, rank, g)
    w0 = 0.02 * torch.randn(96, 80, generator=g, dtype=torch.float64)
    wt = w0 + u @ torch.diag(values) @ v.T
    update = wt - w0
    s = singular_values(update)
    assert torch.allclose(s[:rank], values, atol=1e-9)  # the reported singular values are the planted ones
    assert s[rank:].abs().max() < 1e-9
    assert rank * 0.97 <= effective_rank(update) <= rank + 1e-6
    assert rank * (2.0 / 3.0) ** 2 - 1e-9 <= stable_rank(update) <= rank + 1e-9
    assert top_k_energy(update, rank) == pytest.approx(1.0)
    # equal singular values: both ranks are exactly r
    flat = u @ v.T
    assert effective_rank(flat) == pytest.approx(rank, rel=1e-9)
    assert stable_rank(flat) == pytest.approx(rank, rel=1e-9)
    assert top_k_energy(flat, 1) == pytest.approx(1.0 / rank)


def test_ranks_of_noise_and_zero():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 50, generator=g)
    assert effective_rank(noise) > 40 and stable_rank(noise) > 10
    assert effective_rank(torch.zeros(5, 5)) == 0.0 and stable_rank(torch.zeros(5, 5)) == 0.0


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    q = _orthonormal(16, 16, g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, 0.3 * x @ q + 4.0) == pytest.approx(1.0, abs=1e-10)  # and a shift (centring)
    assert linear_cka(x, torch.randn(2000, 24, generator=g, dtype=torch.float64)) < 0.05  # unrelated
    # a non-isotropic map is not invariant: scaling one feature changes the value
    stretched = x.clone()
    stretched[:, 0] *= 10
    assert linear_cka(x, stretched) < 0.5
    assert linear_cka(x, x[:, :8]) == pytest.approx(math.sqrt(0.5), abs=0.02)


def test_filter_normalisation_matches_weight_filter_norms():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 7, generator=g) * torch.arange(1, 13)[:, None]
    direction = filter_normalize(torch.randn(12, 7, generator=g), weight, dim=0)
    assert torch.allclose(direction.norm(dim=1), weight.norm(dim=1), rtol=1e-5)
    factor = torch.randn(7, 12, generator=g) * torch.arange(1, 13)[None]  # [D_in, D_out]: filters are columns
    direction = filter_normalize(torch.randn(7, 12, generator=g), factor, dim=1)
    assert torch.allclose(direction.norm(dim=0), factor.norm(dim=0), rtol=1e-5)
    assert filter_dim("blocks.0.mlp.up_proj.cola_a") == 1 and filter_dim("blocks.0.attn.q_proj.weight") == 0


def _tiny(linear="dense"):
    cfg = ModelConfig(preset="tiny", vocab_size=96, linear=linear, max_seq_len=64)
    return build_model(cfg, seed=3)


def _batches(vocab=96):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 3, 17), generator=g)
    return Batches(items=[(b[:, :-1], b[:, 1:]) for b in ids], source="random")


def test_random_direction_is_filter_normalised_per_tensor_and_reproducible():
    model = _tiny()
    weights = ModuleWeights(model)
    direction = RandomDirection(5, weights.get)
    for name in ("blocks.0.attn.q_proj.weight", "embed.weight", "head.weight"):
        d, w = direction(name), weights.get(name)
        assert torch.allclose(d.norm(dim=1), w.norm(dim=1), rtol=1e-4)
        assert torch.equal(d, RandomDirection(5, weights.get)(name))
    assert direction("blocks.0.attn_norm.weight") is None  # gains stay put


def test_interpolation_between_identical_checkpoints_is_flat():
    model, weights = _tiny(), ModuleWeights(_tiny())  # the evaluated model never aliases a source
    batches = _batches()
    losses = interpolation_curve(model, weights.get, weights.get, np.linspace(0, 1, 5), batches)
    assert max(losses) - min(losses) == 0.0
    assert barrier_height(np.linspace(0, 1, 5), losses) == 0.0
    # between two different inits the path is not flat, and the barrier is what rises above the chord
    other = ModuleWeights(build_model(model.config, seed=4))
    losses = interpolation_curve(model, weights.get, other.get, np.linspace(0, 1, 5), batches)
    assert max(losses) - min(losses) > 0
    assert barrier_height([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier_height([0, 0.5, 1], [1.0, 1.2, 2.0]) == 0.0


def test_loss_curve_restores_the_base_and_sharpness_of_a_parabola():
    model, weights = _tiny(), ModuleWeights(_tiny())
    batches = _batches()
    before = mean_loss(model, batches)
    grid = np.linspace(-0.5, 0.5, 5)
    losses = loss_curve(model, weights.get, RandomDirection(0, weights.get), grid, batches)
    assert losses[2] == pytest.approx(before, abs=1e-6)
    assert mean_loss(model, batches) == pytest.approx(before, abs=1e-6)
    assert losses[0] != losses[2]
    alphas = np.linspace(-1, 1, 21)
    summary = sharpness(alphas, 3.0 * alphas**2 + 1.0, radius=0.2)
    assert summary["curvature"] == pytest.approx(6.0) and summary["rise_at_radius"] == pytest.approx(0.12)


def test_trajectory_pca_recovers_a_straight_trajectory():
    model = _tiny()
    end = ModuleWeights(model)
    shift = RandomDirection(1, end.get)
    points = []
    for t in (3.0, 2.0, 1.0):  # checkpoints on one line towards the end point
        m = _tiny()
        with torch.no_grad():
            for name, p in m.named_parameters():
                d = shift(name)
                if d is not None:
                    p.add_(t * 0.01 * d)
        points.append(ModuleWeights(m))
    pca = TrajectoryPCA(points, end, components=2)
    assert len(pca.components) == 1 and pca.explained[0] == pytest.approx(1.0)
    coords = np.abs(pca.coords[0])
    assert coords[0] / coords[2] == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize(
    "layer_cls, kwargs",
    [(LoRALinear, dict(alpha=8.0, dropout=0.0)), (SLTrainLinear, dict(alpha=8.0, density=0.1)), (CoLALinear, {})],
)
def test_lowrank_layers_are_merged_to_their_dense_equivalent(layer_cls, kwargs):
    torch.manual_seed(0)
    layer = layer_cls(24, 16, 4, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    state = {f"blocks.0.attn.q_proj.{k}": v for k, v in layer.state_dict().items()}
    [(spec, matrix)] = list(model_matrices(list(state), state.__getitem__, lowrank_alpha=8.0))
    assert spec.kind == "attn.q" and spec.layer == 0 and matrix.shape == (16, 24)
    if layer_cls is CoLALinear:
        assert "without the SiLU" in spec.note
        assert torch.allclose(matrix, (layer.cola_a @ layer.cola_b).T.detach())
    else:
        assert torch.allclose(matrix, layer.dense_weight(), atol=1e-5)
        x = torch.randn(3, 24)
        assert torch.allclose(x @ matrix.T, layer(x).detach(), atol=1e-4)  # the layer's own map
