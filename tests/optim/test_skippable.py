"""megatrain.optim.skippable: while `skip_next_step` is set, step() leaves parameters and state
untouched, and the update sequence afterwards is the one of the plain optimizer that never saw the
skipped step; build_optimizer hands out these named classes (apex's FusedAdam included)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from megatrain.config import Config
from megatrain.optim import FiraAdamW, GaLoreAdamW, build_optimizer
from megatrain.optim.skippable import (
    SkippableAdamW,
    SkippableFiraAdamW,
    SkippableGaLoreAdamW,
    SkipStepMixin,
    skippable_apex_fused_adam,
)

CASES = {
    "adamw": (SkippableAdamW, torch.optim.AdamW, {}),
    "galore": (SkippableGaLoreAdamW, GaLoreAdamW, {"rank": 2, "update_proj_gap": 2, "scale": 0.5}),
    "fira": (SkippableFiraAdamW, FiraAdamW, {"rank": 2, "update_proj_gap": 2, "scale": 0.5}),
}


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]


def _grads(steps):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)] for _ in range(steps)]


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _make(cls, params, extra):
    groups = [{"params": params[:1], **extra}, {"params": params[1:]}] if extra else [{"params": params}]
    return cls(groups, lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("name", list(CASES))
def test_skipped_step_changes_nothing_and_the_rest_follows_the_plain_optimizer(name):
    skippable_cls, plain_cls, extra = CASES[name]
    assert issubclass(skippable_cls, plain_cls) and skippable_cls.__name__ == f"Skippable{plain_cls.__name__}"
    ours, ref = _params(), _params()
    opt, plain = _make(skippable_cls, ours, extra), _make(plain_cls, ref, extra)
    applied = []
    opt.after_step = lambda: applied.append(True)
    grads = _grads(5)
    for i, step_grads in enumerate(grads):
        skip = i == 2
        for p, q, g in zip(ours, ref, step_grads):
            p.grad = g.clone()
            q.grad = g.clone()
        before = [p.detach().clone() for p in ours]
        state_before = copy.deepcopy(opt.state_dict())
        opt.skip_next_step = skip
        opt.step()
        opt.skip_next_step = False
        if skip:
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            _assert_same(opt.state_dict(), state_before)
        else:
            plain.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert len(applied) == 4  # after_step follows every applied step, never a skipped one


def test_build_optimizer_hands_out_the_named_classes():
    torch.manual_seed(0)
    from megatrain.models.transformer import Transformer

    cfg = Config()
    cfg.model.preset = "tiny"
    model_cfg = cfg.model.resolved()
    model_cfg.vocab_size = 64
    model = Transformer(model_cfg)
    assert type(build_optimizer(cfg.optim, model, 1e-3, on_cuda=False)) is SkippableAdamW
    cfg.optim.rank = 4
    for name, cls, plain in (("galore", SkippableGaLoreAdamW, GaLoreAdamW), ("fira", SkippableFiraAdamW, FiraAdamW)):
        cfg.optim.name = name
        client = build_optimizer(cfg.optim, model, 1e-3, on_cuda=False)
        assert type(client) is cls and type(client.projected) is plain
        assert not client.skip_next_step and client.after_step is None


def test_apex_fused_adam_is_wrapped_when_importable(monkeypatch):
    class FusedAdam(torch.optim.AdamW):  # apex's signature: adam_w_mode instead of a class per rule
        def __init__(self, params, adam_w_mode=True, **kw):
            super().__init__(params, **kw)

    apex = types.ModuleType("apex")
    apex.optimizers = types.SimpleNamespace(FusedAdam=FusedAdam)
    skippable_apex_fused_adam.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "apex", apex)
        monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
        cls = skippable_apex_fused_adam()
        assert cls.__name__ == "SkippableFusedAdam" and issubclass(cls, FusedAdam) and issubclass(cls, SkipStepMixin)
        assert skippable_apex_fused_adam() is cls  # one class, not one per call
        cfg = Config()
        cfg.optim.fused = "apex"
        model = torch.nn.Linear(3, 2)
        assert type(build_optimizer(cfg.optim, model, 1e-3, on_cuda=True)) is cls
        skippable_apex_fused_adam.cache_clear()
        monkeypatch.setitem(sys.modules, "apex", None)
        monkeypatch.delitem(sys.modules, "apex.optimizers")
        assert skippable_apex_fused_adam() is None
    finally:
        skippable_apex_fused_adam.cache_clear()
