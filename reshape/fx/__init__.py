"""The torch.fx path: any module no family adapter claims, rewritten as a graph.

tracer.py  tracer settings in one place (leaves, patches, each with its reason)
stack.py   the repeated block stack, traced as leaves so the top-level graph is a chain
depth.py   dropping blocks by rewiring, kept blocks renumbered
heads.py   locating attention in a block graph and re-heading it (keep-width or keep-head-dim)
rewrite.py plan and apply: trace -> keep blocks -> re-head; deterministic
source.py  factories (`package.module:function`) and timm models without an adapter
folder.py  convert to a folder (safetensors, generated code, reshape.json) and `load` it back
"""

from .folder import convert, load
from .rewrite import apply_plan, leaner, plan_fx
from .source import fx_source

__all__ = ["apply_plan", "convert", "fx_source", "leaner", "load", "plan_fx"]
