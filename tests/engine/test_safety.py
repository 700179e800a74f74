"""What megatrain reads it reads without executing anything, and what it writes stays in run.dir:
checkpoints through safetensors or torch.load(weights_only=True), configs through yaml.safe_load,
no path from a config outside the run directory, and megatrain.load refuses pickles (test_hf.py)."""

from __future__ import annotations

import ast
import os

import pytest
import torch

from megatrain.config import load_config
from megatrain.errors import ConfigError
from tests.conftest import REPO


class _Payload:
    """Unpickling this creates a directory: proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _calls(tree, dotted: str):
    owner, name = dotted.rsplit(".", 1)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == name
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == owner
        ):
            yield node


def test_no_unsafe_loader_in_the_source():
    """Every torch.load passes weights_only=True; no yaml.load / unsafe_load / full_load, pickle, or
    numpy loads with allow_pickle anywhere in megatrain/ or kernels/."""
    checked = 0
    for folder in ("megatrain", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for call in _calls(tree, "torch.load"):
                flags = {k.arg: k.value for k in call.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{path}:{call.lineno}: torch.load without weights_only=True"
                )
                checked += 1
            for unsafe in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load", "pickle.loads"):
                found = [c.lineno for c in _calls(tree, unsafe)]
                assert not found, f"{path}:{found}: {unsafe}"
            for node in ast.walk(tree):
                if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                    raise AssertionError(f"{path}:{node.value.lineno}: allow_pickle")
    assert checked >= 2  # the RNG states and the universal-checkpoint KV fix-up


def test_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  dir: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(config))
    assert "is not valid YAML" in str(err.value) and "\n" not in str(err.value)
    cfg = load_config(None, [f"run.dir=!!python/object/apply:os.mkdir ['{marker}']"])  # an override: a plain string
    assert isinstance(cfg.run.dir, str) and not marker.exists()


def test_universal_checkpoint_fixup_reads_weights_only(tmp_path):
    from megatrain.engine.reshard import _map_kv_tensors

    zero = tmp_path / "zero"
    param = zero / "blocks.0.attn.k_proj.weight"
    param.mkdir(parents=True)
    torch.save({"param": torch.arange(8.0).reshape(4, 2), "cat_dim": 0}, param / "fp32.pt")
    _map_kv_tensors(str(zero), lambda t, dim: t[:2])
    assert torch.equal(torch.load(param / "fp32.pt", weights_only=True)["param"], torch.arange(4.0).reshape(2, 2))
    marker = tmp_path / "ran"
    torch.save({"param": torch.zeros(2), "extra": _Payload(marker)}, param / "exp_avg.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        _map_kv_tensors(str(zero), lambda t, dim: t)
    assert not marker.exists()


def test_run_paths_stay_inside_run_dir(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    assert cfg.run.path("from_step_4", "grpo") == os.path.join(str(tmp_path / "run"), "from_step_4", "grpo")
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path, tmp_path / "run" / "link")
    for parts in (("..", "elsewhere"), ("from_step_4", "../../x"), (str(tmp_path / "abs"),), ("link", "x"), (".",)):
        with pytest.raises(ConfigError, match="leads outside run.dir") as err:
            cfg.run.path(*parts)
        assert "\n" not in str(err.value)
    # The config-given names that become sub-folders are checked names in the first place.
    from megatrain.rl.config import validate_rl

    with pytest.raises(ConfigError, match="rl.pipeline='../x' is not allowed"):
        validate_rl(load_config(None, ["rl.pipeline=../x", "rl.init=somewhere"]))
