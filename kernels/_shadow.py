"""What `import kernels` gets when the repository root is on sys.path: the package this folder shadows.

This folder installs as megatrain.kernels (pyproject's package-dir) and is never a top-level package.
From a checkout, `python -c` and `python -m` put the root first on sys.path, and `import kernels` (which
transformers >= 5.25 does for Hugging Face's `kernels` package) would find this folder instead.
`hand_over` loads the package of that name from the rest of sys.path into sys.modules in its place.
Where there is none, the folder stays what a folder without __init__.py is to Python: an empty
namespace package (no __file__, nothing inside), which is how transformers' availability checks
recognise a folder that merely shadows a package name (they import it and look for __file__). Standard
library only: it runs before anything of megatrain is imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace sys.modules[name] (this folder, imported as `name`) with the module `name` that the
    sys.path entries other than the repository root provide; without one, empty sys.modules[name]."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, rest)
    if spec is None or spec.loader is None:
        shadow = sys.modules[name]
        for attribute in [a for a in vars(shadow) if not a.startswith("__")]:
            delattr(shadow, attribute)  # what this folder's __init__ bound so far (hand_over, _shadow)
        shadow.__file__, shadow.__path__ = None, []
        return
    module = importlib.util.module_from_spec(spec)
    # The import statement returns what sys.modules holds once this folder's __init__ has run; if the
    # other package fails to import, the import machinery removes the name again.
    sys.modules[name] = module
    spec.loader.exec_module(module)
