"""reshape: rebuild transformers with more attention heads and fewer layers (arXiv 2505.20802)."""

__version__ = "0.1.0"

from .pipeline import convert, inspect, leaner, load  # noqa: E402
from .hub import push  # noqa: E402
from .report import report  # noqa: E402
from .errors import Problem, ReshapeError  # noqa: E402
from .plan import Plan, Shape, make_plan, select_layers  # noqa: E402

__all__ = ["Plan", "Problem", "ReshapeError", "Shape", "convert", "inspect", "leaner", "load", "make_plan", "push", "report",
           "select_layers"]
