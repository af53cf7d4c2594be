"""reshape: rebuild transformers with more attention heads and fewer layers (arXiv 2505.20802).

The public API is imported on first use (PEP 562), so `import reshape` and `reshape --help` do not
pay for torch, transformers and timm until a function that needs them is called.
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> the module that defines it (no module may share a public name: importing reshape.X
# would set the package attribute X to the module)
_API = {"convert": "config_convert", "inspect": "config_shape", "leaner": "pipeline", "load": "pipeline", "push": "hub",
        "report": "reporting", "Problem": "errors", "ReshapeError": "errors", "Plan": "plan", "Shape": "plan",
        "make_plan": "plan", "select_layers": "plan"}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'reshape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
