"""The torch.fx path: any module no family adapter claims, rewritten as a graph.

tracer.py  tracer settings in one place (leaves, patches, each with its reason)
stack.py   the repeated block stack, traced as leaves so the top-level graph is a chain
depth.py   dropping blocks by rewiring, kept blocks renumbered
graph.py   the fx vocabulary the attention rewrites share (view, softmax, pass-through calls, shape arguments)
locate.py  finding each attention in a block graph: its head count, head dim, scales and score biases
biases.py  learned per-head score biases: each new head adds its parent head's
keep_width.py  keep-width re-heading: the same weights read as more, narrower heads
widen.py   keep-head-dim re-heading: wider Q/K/V/O projections filled by the Net2Net rule
rewrite.py plan and apply: trace -> keep blocks -> re-head; deterministic
source.py  factories (`package.module:function`) and timm models without an adapter
folder.py  convert to a folder (safetensors, generated code, reshape.json) and `load` it back
"""

from .folder import convert, load
from .rewrite import apply_plan, leaner, plan_fx
from .source import fx_source

__all__ = ["apply_plan", "convert", "fx_source", "leaner", "load", "plan_fx"]
