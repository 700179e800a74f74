"""The data stages import one way: sources -> tokenizer -> token_cache -> sampler; tasks -> sources.

Read from the source with `ast` (imports inside functions count too), so a back-import fails here
even when it would only run on some path.
"""

import ast
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "megatrain" / "data"

# The megatrain modules each stage may import. The package's __init__ composes them all.
ALLOWED = {
    "sources": {"megatrain.errors", "megatrain.env", "megatrain.data.corpus"},
    "tokenizer": {"megatrain.errors", "megatrain.data.sources"},
    "token_cache": {"megatrain.errors", "megatrain.data.sources", "megatrain.data.tokenizer"},
    "sampler": {"megatrain.errors"},
    "tasks": {"megatrain.errors", "megatrain.constants", "megatrain.data.sources"},
    # long-context evaluation tasks of the qTTT job (read by megatrain.ttt, not by the pipeline)
    "longcontext": {"megatrain.errors", "megatrain.data.corpus", "megatrain.data.sources"},
    "__init__": {
        "megatrain.errors",
        "megatrain.data.sources",
        "megatrain.data.tokenizer",
        "megatrain.data.token_cache",
        "megatrain.data.sampler",
        "megatrain.data.tasks",
    },
}


def megatrain_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            found.add(node.module)
    return {name for name in found if name == "megatrain" or name.startswith("megatrain.")}


def test_every_stage_is_listed():
    assert {p.stem for p in DATA.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_what_comes_before_it(stage):
    imported = megatrain_imports(DATA / f"{stage}.py")
    assert imported <= ALLOWED[stage], f"{stage}.py imports {sorted(imported - ALLOWED[stage])}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from megatrain.config import Config\n    import megatrain.models.transformer\n")
    assert megatrain_imports(path) == {"megatrain.config", "megatrain.models.transformer"}
