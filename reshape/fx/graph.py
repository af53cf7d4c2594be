"""The fx vocabulary the attention rewrites share: which calls split or merge heads, which pass values
through unchanged, and small readers and editors of nodes' shape arguments."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


VIEWS = {"view", "reshape"}


SOFTMAX = {torch.softmax, F.softmax}


MATMUL = {operator.matmul, torch.matmul, torch.bmm}


PASS_METHODS = {"contiguous", "float", "half", "bfloat16", "type_as", "to", "clone"}


PASS_MODULES = (nn.Identity, nn.Dropout)


FLATTEN = {"flatten"}


class Unsupported(Exception):
    """The attention is there but reshape cannot re-head it; the message names the node and why."""


def is_op(node, op, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target in targets


def module_of(gm, node):
    return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None


def shape_args(view: fx.Node) -> list:
    args = list(view.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if "shape" in view.kwargs:
        args = list(view.kwargs["shape"])
    return args


def set_shape_arg(view: fx.Node, pos: int, value) -> None:
    args = shape_args(view)
    args[pos] = value
    if "shape" in view.kwargs:
        view.kwargs = {**view.kwargs, "shape": tuple(args)}
    elif len(view.args) == 2 and isinstance(view.args[1], (tuple, list)):
        view.args = (view.args[0], tuple(args))
    else:
        view.args = (view.args[0], *args)


def uses_params(gm, node, seen=None) -> bool:
    """Does this value depend on a learned parameter of the block (a per-head bias, a learned scale)?"""
    seen = set() if seen is None else seen
    if not isinstance(node, fx.Node) or node in seen or node.op == "placeholder":
        return False
    seen.add(node)
    if node.op == "get_attr" and isinstance(getattr_path(gm, node.target), nn.Parameter):
        return True
    if node.op == "call_module" and any(True for _ in module_of(gm, node).parameters()):
        return True
    return any(uses_params(gm, a, seen) for a in node.all_input_nodes)


def getattr_path(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def only_sizes(node, seen=None) -> bool:
    """Is this a value computed from tensor sizes only (a run-time scale such as k.size(-1) ** -0.5)?"""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "call_method" and node.target == "size" or node.op == "call_function" and node.target is getattr:
        return True
    if node.op != "call_function":
        return False
    return all(only_sizes(a) for a in node.all_input_nodes)


def is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def permute_dims(node: fx.Node) -> tuple:
    return tuple(node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1])


def passes_through(gm, node) -> bool:
    return is_op(node, "call_method", PASS_METHODS) or isinstance(module_of(gm, node), PASS_MODULES)


def only_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise Unsupported(f"uses {node.name} {'more than once' if users else 'nowhere'}, so reshape cannot "
                          "follow it between the projections and the attention")
    return users[0]


def count_of(arg) -> tuple[str, int] | None:
    """How a shape argument holds a number: ("const", n), ("div", n) for `x // n`, ("mul", n) for
    `x * n`; None when it is computed at run time."""
    if isinstance(arg, int):
        return ("const", arg)
    if is_op(arg, "call_function", {operator.floordiv}) and isinstance(arg.args[1], int):
        return ("div", arg.args[1])
    if is_op(arg, "call_function", {operator.mul}) and isinstance(arg.args[1], int):
        return ("mul", arg.args[1])
    return None
