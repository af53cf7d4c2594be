"""Calibration one block at a time: the activations `--select importance` and the aware head split
need, from a safetensors folder that is never loaded whole.

The model is built on the meta device. The calibration batches first go through the model's own
forward with the tensors outside the block stack read from the checkpoint (embeddings, position
tables, norms; rotary frequencies are buffers, built with the model), block 0 read too, and every
other block replaced by a stand-in that hands its input on unchanged and records what the model's
loop passed it; the forward stops at the last block, so the head never runs. That pass gives each
batch's input to block 0 (hidden states, attention mask, rotary position embeddings, cache: all as
the model itself made them) and checks, for every batch, that the model's loop gives each block the
same arguments (the same objects) and the previous block's output unchanged. Then each further block
is read, run on every batch's hidden states in turn, and freed. Every block sees exactly the inputs
it sees in the model's own forward, in the same order of batches, so hooks on the blocks (Block
Influence, the attention input covariances) record what they record on the model in memory.

Peak memory: the tensors outside the stack during the first pass, then one block, plus the
activations of all batches (each batch's hidden states and the arguments the model made for it, its
KV cache included when the model keeps one). A model whose loop does more than call its blocks in
turn with the same arguments (a different mask per layer, a block that runs at every depth, a
module between two blocks) raises `NotBlockwise` before any block past the first is read.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .inputs import evaluating

OnBatch = Callable[[int, dict], None]


class NotBlockwise(Exception):
    """The model's loop does not call its blocks in a way this runner can replay (the message says how)."""


class _Stop(Exception):
    """Raised past the last block: the rest of the forward (final norm, head) is not needed."""


class BlockRunner:
    """Runs calibration batches through `model` (built on the meta device) one block at a time,
    reading each block's tensors from `checkpoint` (reshape/streaming.py Checkpoint) and freeing them
    after. Called as `runner(batches, on_batch, last)`: blocks 0..last run on every batch, and
    `on_batch(index, batch)` is called before each block runs on a batch, as the in-memory runner
    (reshape/inputs.py `whole_model`) calls it before each batch's forward."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, prefix: str, checkpoint):
        self.model, self.layers, self.prefix, self.checkpoint = model, layers, prefix, checkpoint
        state = model.state_dict(keep_vars=True)
        # Each tensor's checkpoint key: its own, or for a tied copy the key of the copy that was saved.
        saved: dict[int, str] = {id(t): k for k, t in state.items() if k in checkpoint.shapes}
        self.keys = {name: name if name in checkpoint.shapes else saved.get(id(t)) for name, t in state.items()}
        self.dtypes = {name: t.dtype for name, t in state.items()}
        base = getattr(model, "base_model", model)  # a timm model is its own base: no head apart
        base_prefix = next((f"{n}." for n, m in model.named_modules() if m is base and n), "")
        # Outside the stack, in the base model: what the forward runs before the first block (and the
        # final norm, which it does not reach). The heads outside the base model are never read (a
        # timm model's are read with the rest: they are small).
        self.outside = [n for n in state if n.startswith(base_prefix) and not n.startswith(prefix)]

    def _load(self, names: list[str]) -> list[str]:
        """Read these tensors (full names in the model) from the checkpoint into the model."""
        loaded = []
        try:
            for name in names:
                if self.keys[name] is None:
                    raise NotBlockwise(f"{name} is in no checkpoint file")
                value = self.checkpoint.get(self.keys[name], self.dtypes[name])
                _set_tensor(self.model, name, "cpu", value)
                loaded.append(name)
        except BaseException:
            self._free(loaded)
            raise
        return loaded

    def _free(self, names: list[str]) -> None:
        for name in names:
            _set_tensor(self.model, name, "meta")

    def _block_names(self, index: int) -> list[str]:
        start = f"{self.prefix}{index}."
        return [n for n in self.keys if n.startswith(start)]

    @torch.no_grad()
    def __call__(self, batches: Iterable[dict], on_batch: OnBatch, last: int) -> None:
        batches = list(batches)
        with evaluating(self.model):
            inputs, hidden = self._first_pass(batches, on_batch)
            for index in range(1, last + 1):
                block = self.layers[index]
                loaded = self._load(self._block_names(index))
                try:
                    for b, batch in enumerate(batches):
                        on_batch(b, batch)
                        args, kwargs = _with_hidden(*inputs[b], hidden[b])
                        hidden[b] = _first(block(*args, **kwargs))
                finally:
                    self._free(loaded)

    def _first_pass(self, batches: list[dict], on_batch: OnBatch):
        """Each batch through the model's forward up to the last block, block 0 real and the others
        stand-ins: each batch's input to block 0 (without its hidden states) and block 0's output."""
        count = len(self.layers)
        calls: list[tuple[int, tuple, dict, object]] = []
        first = self.layers[0]

        def enter(module, args, kwargs):
            calls.append((0, args, dict(kwargs), None))

        def leave(module, args, kwargs, output):
            calls[-1] = calls[-1][:3] + (output,)
            if count == 1:
                raise _Stop

        originals = [self.layers[j] for j in range(1, count)]
        handles = [first.register_forward_pre_hook(enter, with_kwargs=True),
                   first.register_forward_hook(leave, with_kwargs=True)]
        loaded = self._load(self.outside)
        try:
            loaded += self._load(self._block_names(0))
            for j in range(1, count):
                self.layers[j] = _StandIn(originals[j - 1], j, calls, last=j == count - 1)
            inputs, hidden = [], []
            for b, batch in enumerate(batches):
                calls.clear()
                on_batch(b, batch)
                try:
                    self.model(**batch)
                except _Stop:
                    pass
                except NotBlockwise:
                    raise
                except Exception as e:  # e.g. the loop reads more of a block than its calls
                    first_line = (str(e).strip().splitlines() or [""])[0][:150]
                    raise NotBlockwise(f"its forward cannot run with stand-ins for its blocks "
                                       f"({type(e).__name__}: {first_line})") from None
                else:
                    raise NotBlockwise("its forward went on past its last block")
                _check_plain(calls, count)
                _, args, kwargs, output = calls[0]
                inputs.append(_with_hidden(args, kwargs, None))
                hidden.append(_first(output))
            return inputs, hidden
        finally:
            for handle in handles:
                handle.remove()
            for j, block in enumerate(originals, start=1):
                self.layers[j] = block
            calls.clear()
            self._free(loaded)


class _StandIn(nn.Module):
    """A block's place in the first pass: records its arguments and hands its hidden states on, in
    the form block 0 returned them; the last one stops the forward. Other attributes are the block's
    (a loop may read e.g. its attention type)."""

    def __init__(self, block: nn.Module, index: int, calls: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the model's tensors stay the block's
        self.index, self.calls, self.last = index, calls, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        if not self.calls or self.calls[0][0] != 0 or self.calls[-1][0] != self.index - 1:
            raise NotBlockwise(f"its forward called block {self.index} out of turn")
        template = self.calls[0][3]
        hidden = _hidden_of(args, kwargs)
        output = hidden if isinstance(template, torch.Tensor) else type(template)((hidden, *template[1:]))
        self.calls.append((self.index, args, dict(kwargs), output))
        if self.last:
            raise _Stop
        return output


def _check_plain(calls: list, count: int) -> None:
    """Every block called once, in turn, with block 0's arguments (the same objects) and the previous
    block's output as its hidden states."""
    if [c[0] for c in calls] != list(range(count)):
        raise NotBlockwise("its forward does not call each block once, in turn")
    _, args0, kwargs0, out0 = calls[0]
    if not (isinstance(out0, torch.Tensor) or type(out0) in (tuple, list) and out0):
        raise NotBlockwise(f"its blocks return {type(out0).__name__}, not hidden states or a tuple of them")
    at = _hidden_at(args0, kwargs0)
    for j in range(1, count):
        _, args, kwargs, _ = calls[j]
        if _hidden_of(args, kwargs) is not _first(calls[j - 1][3]):
            raise NotBlockwise(f"its forward changes the hidden states between blocks {j - 1} and {j}")
        if len(args) != len(args0) or kwargs.keys() != kwargs0.keys() or _hidden_at(args, kwargs) != at:
            raise NotBlockwise(f"its forward calls block {j} with other arguments than block 0")
        same = all(_same(a, b) for i, (a, b) in enumerate(zip(args, args0)) if i != at) and \
            all(_same(kwargs[k], kwargs0[k]) for k in kwargs if k != at)
        if not same:
            raise NotBlockwise(f"its forward gives block {j} other arguments than block 0 (a mask or position "
                               "embeddings of its own)")


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


def _hidden_at(args: tuple, kwargs: dict) -> int | str:
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    raise NotBlockwise("its blocks take no hidden states (neither a first argument nor hidden_states=)")


def _hidden_of(args: tuple, kwargs: dict):
    at = _hidden_at(args, kwargs)
    return args[at] if at == 0 else kwargs[at]


def _with_hidden(args: tuple, kwargs: dict, hidden) -> tuple[tuple, dict]:
    """The arguments with the hidden states replaced (the same place the layer hooks read them from)."""
    at = _hidden_at(args, kwargs)
    if at == 0:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, at: hidden}


def _first(output):
    """The hidden states a block returns (alone, or first of a tuple; GPT-1's blocks return lists)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _set_tensor(model: nn.Module, name: str, device: str, value: torch.Tensor | None = None) -> None:
    # accelerate is imported on first use: a quarter of a second, which converting from config.json
    # (reshape/config_convert.py, no activations) does not pay.
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value)
