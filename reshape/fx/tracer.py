"""All torch.fx tracer settings in one place, each exception with its reason.

`trace(module, leaves, concrete_args)` returns a GraphModule. A failure names the innermost module
being traced and the operation that broke it, and says how to mark that module as a leaf.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import transformer as torch_transformer

from ..errors import fail


def _seq_len(src, batch_first):
    return src.size(1 if batch_first else 0)


# Functions replaced while tracing: (module, name, replacement, reason).
PATCHES = [
    (torch_transformer, "_get_seq_len", _seq_len,
     "reads src.is_nested, a Python bool fx cannot trace; traced inputs are never nested tensors"),
]

# Module classes always traced as leaves (called as one opaque node): class -> reason.
LEAF_MODULES: dict[type, str] = {
    nn.MultiheadAttention: "its forward branches on mask and tensor properties; reshape re-heads it "
                           "through its num_heads/head_dim attributes instead",
}


def _timm_notrace() -> tuple[set[type], set]:
    """timm's own registry of modules and functions that must not be traced (empty without timm)."""
    import sys

    if "timm" not in sys.modules:  # a model built by timm has imported it; others need not pay for it
        return set(), set()
    from timm.layers import _fx

    # reason: timm marks the layers whose forward has data-dependent control flow itself
    return set(_fx._leaf_modules), set(_fx._autowrap_functions)


class Tracer(fx.Tracer):
    """Leaves: torch.nn's own modules (fx's default), LEAF_MODULES, timm's registry, the user's
    `leaf_modules` (classes or qualified names), and `leaves` (qualified names, e.g. the blocks)."""

    def __init__(self, leaves=(), leaf_modules=()):
        timm_leaves, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(timm_functions))
        self.leaf_names = set(leaves) | {x for x in leaf_modules if isinstance(x, str)}
        self.leaf_types = tuple({*LEAF_MODULES, *timm_leaves, *(x for x in leaf_modules if isinstance(x, type))})
        self.keep_open: set[str] = set()  # containers of the leaves: traced through even if torch.nn's
        for name in self.leaf_names:
            parts = name.split(".")
            self.keep_open.update(".".join(parts[:i]) for i in range(1, len(parts)))
        self.path: list[str] = []  # qualified names of the modules being traced, innermost last

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if qualname in self.keep_open:  # e.g. nn.TransformerEncoder holding the block stack
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return result


def default_concrete_args(module: nn.Module) -> dict:
    """Optional arguments of forward (default None or a bool) are fixed to their defaults: masks and
    flags left out of the call are what makes most forwards traceable."""
    params = inspect.signature(module.forward).parameters.values()
    return {p.name: p.default for p in params
            if p.default is None or isinstance(p.default, bool)}


@contextmanager
def _attributes_kept(root: nn.Module):
    """Tracing runs forward with Proxies, and some forwards store what they compute on the module (timm's
    LeViT and EfficientFormer cache their attention biases in `attention_bias_cache` when not training):
    the source would come out holding Proxies of a dead graph, which breaks the next trace. Every
    module's attributes, and the contents of its plain dicts, lists and sets, are put back afterwards."""
    saved = []
    for module in root.modules():
        attrs = dict(vars(module))
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            state = vars(module)
            for key in [k for k in state if k not in attrs]:
                del state[key]
            state.update(attrs)
            for key, value in contents.items():  # in place: others may hold the same container
                attrs[key].clear()
                attrs[key].update(value) if not isinstance(value, list) else attrs[key].extend(value)


@contextmanager
def _patched():
    with ExitStack() as stack:
        for owner, name, replacement, _ in PATCHES:
            stack.enter_context(mock.patch.object(owner, name, replacement))
        # reason: the fused fast path of nn.TransformerEncoderLayer checks tensor properties in Python;
        # with it off, the traced graph takes the regular path, which computes the same function.
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(before)


def trace(module: nn.Module, leaves=(), leaf_modules=(), concrete_args: dict | None = None,
          name: str = "") -> fx.GraphModule:
    """Trace `module` into a linted GraphModule; an untraceable module is a one-line error."""
    tracer = Tracer(leaves, leaf_modules)
    concrete = default_concrete_args(module) if concrete_args is None else concrete_args
    try:
        with _patched(), _attributes_kept(module):
            graph = tracer.trace(module, concrete_args=concrete)
            graph.lint()
            # Built before the attributes are put back: it copies the tensor constants the tracer
            # stored on the root (`_tensor_constant0`, ...), which must not stay on the source.
            return fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as e:  # tracing runs arbitrary user code: any error means "not traceable"
        inner = tracer.path[-1] if tracer.path else ""
        where = ".".join(x for x in (name, inner) if x) or type(module).__name__
        culprit = module.get_submodule(inner) if inner else module
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail("model", where, f"cannot be traced by torch.fx in {type(culprit).__name__}.forward "
                   f"({type(e).__name__}: {reason})",
                   f"mark it as a leaf: leaf_modules=[{type(culprit).__name__}] (or the name {where!r}) "
                   "in reshape.leaner, or make its forward traceable") from None
