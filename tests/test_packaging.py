"""Packaging: pyproject lists packages explicitly (kernels/ installs as megatrain.kernels), so every package
folder of megatrain/ must be in that list, or a non-editable install silently leaves it out; and the
kernels/ folder never shadows Hugging Face's `kernels` package, from the test process or the root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"megatrain.kernels"} | {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "megatrain").rglob("__init__.py")
    }
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {sorted(listed - found)}"


# The repository's kernels/ folder against Hugging Face's `kernels` package, which transformers >= 5.25
# imports as soon as LlamaForCausalLM is touched (and the dev extra installs).
_LLAMA_FROM_ROOT = (
    "import megatrain, transformers, kernels, megatrain.kernels as mk; transformers.LlamaForCausalLM; "
    "print(kernels.__file__); print(mk.__file__)"
)


def test_import_kernels_is_hugging_face_s_package_in_the_test_process():
    import kernels
    import transformers

    import megatrain.kernels

    transformers.LlamaForCausalLM  # noqa: B018  (the lazy import that loads kernels)
    assert Path(kernels.__file__).resolve().parent != REPO / "kernels"
    assert Path(megatrain.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert str(REPO) not in [str(Path(p or ".").resolve()) for p in sys.path]


@pytest.mark.parametrize("how", ["python -c", "python -m"])
def test_from_the_repository_root_transformers_llama_imports(how, tmp_path):
    """`python -c` / `python -m` put the root first on sys.path: kernels/ must hand the name over."""
    if how == "python -c":
        argv = [sys.executable, "-c", _LLAMA_FROM_ROOT]
    else:
        (tmp_path / "llama_probe.py").write_text(_LLAMA_FROM_ROOT.replace("; ", "\n"))
        argv = [sys.executable, "-m", "llama_probe"]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, ours = proc.stdout.split()
    assert Path(hf).resolve().parent != REPO / "kernels" and "site-packages" in hf
    assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"


def test_without_the_package_it_shadows_kernels_is_an_empty_namespace_from_the_root():
    """Where nothing else is called `kernels` (transformers < 5.25 without it), the folder never poses as
    a top-level package of megatrain's ops: it is what a plain folder is, an empty namespace without
    __file__, which transformers' availability check (it imports the name and looks for __file__)
    reads as not installed."""
    probe = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "import kernels\n"
        "print(kernels.__file__, [a for a in vars(kernels) if not a.startswith('__')], list(kernels.__path__))\n"
        "try:\n    from kernels import rms_norm\nexcept ImportError:\n    print('no rms_norm')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["None [] []", "no rms_norm"], proc.stdout
