"""Streaming conversion: a safetensors folder converted tensor by tensor, never the whole model in memory.

It applies to transformers folders and to timm folders of the families with one block stack (ViT, DeiT,
Eva, CaiT, XCiT, ConViT, TNT); models with several block stacks (timm Swin, DaViT, Twins,
encoder-decoders) are converted in memory. `convert` plans from config.json alone (`can_stream` says
which runs stream). A plan that needs activations (Block Influence for `--select importance`, the
covariances of the aware head split) gets them block by block first (reshape/blockwise.py: one block
read at a time, the same values as on the model in memory). Each kept block's tensors are then read with
safetensors' `safe_open`, put through the same per-block transfer as the in-memory path
(reshape/transfer.py `transfer_block`) and written into output shards as they fill; the tensors outside
the block stack are copied one at a time. Peak memory is one block's tensors (before and after its
transfer) or one tensor outside the stack, whatever the size of the model or of its shards (plus, for
activations, the tensors outside the stack that run before the first block and the calibration
activations), and the folder holds the same tensors and config as the in-memory path writes
(tests/test_streaming.py compares them per family). A timm folder is written as timm's save_for_hf
writes it: config.json and one model.safetensors.
"""

from __future__ import annotations

import copy
import json
import struct
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blockwise import BlockRunner, NotBlockwise
from .confine import INDEX, PICKLES, safetensors_weights
from .errors import fail
from .families import ModelSpec
from .families.hf import HFFamily
from .families.timm_vit import TimmFamily
from .headsplit import attention_input_covariances
from .importance import keep_most_important, layer_scores
from .inputs import random_inputs
from .plan import Plan, Shape, parent_heads
from .transfer import transfer_block

if TYPE_CHECKING:
    from .source import Source

# safetensors' dtype names (the header's "dtype" field)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
FIX = "re-download or re-save the model"
# PreTrainedModel.save_pretrained's default max_shard_size (tests/test_config_convert.py checks it), for a
# source of one file: importing transformers' modeling code to read it takes seconds.
SAVE_PRETRAINED_SHARD = "50GB"


def can_stream(src: Source, plan: Plan, *, importance: bool, calib: str | None) -> bool:
    """Whether `convert` streams this run (else it loads the model in memory, as `leaner` does)."""
    return streaming_conversion(src, plan, importance=importance, calib=calib) is not None


def streaming_conversion(src: Source, plan: Plan, *, importance: bool, calib: str | None) -> "Conversion | None":
    """The planned streaming conversion of this run, or None when it must run in memory. Each exclusion
    says why; the last ones read the safetensors headers and a skeleton of the model on the meta device
    (kept for the conversion, so they are built once), so a source whose files are unusable raises the
    same one-line error either path gives."""
    family, config = src.spec.family, src.spec.config
    if src.folder is None or src.gguf_file:
        return None  # a timm name has no weights; GGUF tensors are quantised and dequantised on load
    if family.staged:
        # Hierarchical models (timm Swin, DaViT, Twins) and encoder-decoders: several block stacks, each
        # with its own plan (transfer_stages). Streaming follows one stack; these are converted in memory.
        return None
    if plan.init != "transfer":
        return None  # a fresh model is initialised in memory
    if (importance or splits_aware(plan)) and activation_problem(family, config):
        return None  # Block Influence and the aware split need activations, which these get in memory only
    timm = family.library == "timm"
    if getattr(config, "auto_map", None) or getattr(config, "quantization_config", None) is not None:
        return None  # remote code and quantised weights: their own loading code may rewrite any tensor
    if not _inherits(family, "save", TimmFamily if timm else HFFamily):
        return None  # a family that saves its own way
    checkpoint = Checkpoint(src.folder, src.name, sharded=not timm)  # timm loads model.safetensors only
    # timm.create_model builds the model in torch's default dtype and copies the weights into it.
    dtype = torch.get_default_dtype() if timm else load_dtype(getattr(config, "dtype", None), checkpoint)
    if dtype is None:
        return None  # mixed dtypes and none in config.json: from_pretrained's pick is the first tensor's
    source = skeleton(src.spec, dtype)
    if not timm and (_converts_weights(source) or _keeps_fp32(source, dtype)):
        # transformers renames or fuses this class's weights on load and back on save (MoE experts,
        # legacy names), or loads some modules in float32: the checkpoint is not the state dict
        return None
    expected = saved_state(source)
    if set(checkpoint.shapes) != set(expected):
        return None  # legacy or prefixed names, missing or extra weights: from_pretrained fixes them up
    if timm and any(checkpoint.shapes[key] != tuple(t.shape) for key, t in expected.items()):
        return None  # timm's checkpoint filters adapt some tensors to the model (position embeddings resampled)
    new = skeleton(ModelSpec(family, family.new_config(config, family.shape(config), plan), src.spec.cls), dtype)
    produced = set(_sources(checkpoint, layers_prefix(source, family), layer_plan(family, plan).keep,
                            saved_state(new)))
    if produced != set(saved_state(new)):
        return None  # some output tensor comes from no single source tensor or block
    return Conversion(src, plan, checkpoint, dtype, source, new, importance=importance)


def splits_aware(plan: Plan) -> bool:
    """Whether the plan's head split is fitted on activations (as pipeline._input_covariances decides)."""
    return plan.head_split == "aware" and plan.init == "transfer"


def activation_problem(family, config) -> str | None:
    """Why the activations of this model cannot be computed one block at a time (reshape/blockwise.py),
    as far as config.json tells; None when they can. The block-by-block run checks the rest on the
    model's own forward (a module between two blocks, arguments of their own per block) and `convert`
    falls back to the model in memory when that check fails."""
    if family.shared_layers:
        return "one block runs at every depth (ALBERT): its calls cannot be taken one block at a time"
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(map(str, kinds))) > 1:
        return (f"its layers are of several types ({', '.join(sorted(set(map(str, kinds))))}), and each type "
                "gets its own attention mask or position embeddings from the model's forward")
    return None


class StreamPlan:
    """What a streamed conversion writes: each output tensor (on the meta device), where it comes from (a
    tensor outside the block stack, or a kept block put through `transfer_block`), and the writing, shard
    by shard. `Conversion` plans it from models on the meta device; reshape/config_convert.py from
    config.json alone. A subclass writes the config files (`write_config`)."""

    def __init__(self, family, shape: Shape, checkpoint: "Checkpoint", expected: dict[str, torch.Tensor], prefix: str):
        self.family, self.shape, self.checkpoint, self.expected = family, shape, checkpoint, expected
        self.checkpoint.check(expected)  # wrong shape or dtype: refused before anything is written
        self.prefix = prefix  # the block stack's, e.g. 'model.layers.'
        self.covs: dict[int, torch.Tensor] | None = None  # aware split: source layer -> its input covariance
        self._block: tuple[int, dict[str, torch.Tensor]] | None = None  # the one block held in memory

    def set_plan(self, plan: Plan, outputs: dict[str, torch.Tensor], outside: dict[str, int]) -> None:
        """The plan and the tensors it gives (`outside`: per-head tensors outside the stack -> head axis)."""
        self.plan, self.outputs, self.outside = plan, outputs, outside
        self.keep = layer_plan(self.family, plan).keep
        self.sources = _sources(self.checkpoint, self.prefix, self.keep, outputs)
        self.nbytes = sum(t.numel() * t.element_size() for t in outputs.values())

    def write_config(self, folder: Path) -> tuple[dict[str, list[str]], dict | None, dict[str, str] | None]:
        """Write the config files; return the shards (file name -> tensor names), the index (None for one
        file) and the shards' header metadata."""
        raise NotImplementedError

    def write(self, folder: Path) -> None:
        """The folder: the config files, then the weights, shard by shard, and the index."""
        files, index, metadata = self.write_config(folder)
        try:
            for filename, names in files.items():
                write_shard(folder / filename, {name: self.outputs[name] for name in names}, self.tensor, metadata)
        finally:
            self._block = None
        if index:
            (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def tensor(self, name: str) -> torch.Tensor:
        """One output tensor: its kept block's, transferred, or a tensor from outside the stack."""
        source = self.sources[name]
        if isinstance(source, str):
            self._block = None  # outside the stack: free the held block (one asked for again is reread)
            tensor = self.checkpoint.get(source, self.expected[source].dtype)
            if name in self.outside:  # per-head tensors outside the stack follow their parent heads (rebuild)
                tensor = tensor.index_select(self.outside[name], torch.tensor(parent_heads(self.shape, self.plan)))
            return tensor
        new_index, rel = source
        if self._block is None or self._block[0] != new_index:
            self._block = None  # free the last block before reading the next
            old = f"{self.prefix}{self.keep[new_index]}."
            layer = {key[len(old):]: self.checkpoint.get(key, self.expected[key].dtype)
                     for key in self.checkpoint.shapes if key.startswith(old)}
            cov = (self.covs or {}).get(self.keep[new_index])
            self._block = new_index, transfer_block(layer, self.family.weights, self.shape, self.plan, cov,
                                                    self.family.adjust_block)
        return self._block[1][rel]


class Conversion(StreamPlan):
    """A planned streaming conversion: what will be written, checked against the source's headers
    before anything is written. `source` and `new` are the models on the meta device (for the recipe)."""

    def __init__(self, src: Source, plan: Plan, checkpoint: "Checkpoint", dtype: torch.dtype, source: nn.Module,
                 new: nn.Module, importance: bool = False):
        family = src.spec.family
        self.spec, self.dtype, self.source = src.spec, dtype, source
        super().__init__(family, family.shape(src.spec.config), checkpoint, saved_state(source),
                         layers_prefix(source, family))
        self.importance = importance  # the kept layers are picked by `score_layers` first
        self._set_plan(plan, new)

    def _set_plan(self, plan: Plan, new: nn.Module) -> None:
        self.new = new
        outside = self.family.outside_per_head(self.source) if plan.heads != self.shape.heads else {}
        self.set_plan(plan, saved_state(new), outside)

    def _runner(self) -> tuple[nn.Module, nn.Module, BlockRunner]:
        """A fresh meta model, its block stack, and a runner that reads its blocks one at a time."""
        model = skeleton(self.spec, self.dtype)
        layers = self.family.layers(model)
        return model, layers, BlockRunner(model, layers, layers_prefix(model, self.family), self.checkpoint)

    def score_layers(self, batches: list[dict] | None) -> list[float]:
        """Block Influence of every layer on `batches` (random tokens without them), one block at a time
        (pipeline.convert computes it on the model in memory; the scores are the same), and the plan
        keeps the highest-scoring layers. Raises NotBlockwise when the model's loop cannot be replayed."""
        model, layers, runner = self._runner()
        scores = layer_scores(model, layers, batches or random_inputs(model), run=runner)
        plan = keep_most_important(self.family, self.shape, self.plan, scores)
        new = skeleton(ModelSpec(self.family, self.family.new_config(self.spec.config, self.shape, plan),
                                 self.spec.cls), self.dtype)
        if set(_sources(self.checkpoint, self.prefix, layer_plan(self.family, plan).keep,
                        saved_state(new))) != set(saved_state(new)):
            raise NotBlockwise("with the layers picked, some output tensor comes from no single source tensor")
        self._set_plan(plan, new)
        return scores

    def fit_head_split(self, batches: list[dict] | None) -> None:
        """The attention input covariances of the kept layers for the aware split, on `batches` (random
        inputs without them), one block at a time (as pipeline._input_covariances, in memory)."""
        model, layers, runner = self._runner()
        batches = random_inputs(model) if batches is None else batches
        self.covs = attention_input_covariances(model, layers, self.family.weights, self.plan.keep, batches,
                                                run=runner)

    def write_config(self, folder: Path) -> tuple[dict[str, list[str]], dict | None, dict[str, str] | None]:
        """For transformers, config.json (and generation_config.json) as `save_pretrained` writes them, and
        its shards; for timm, config.json as `save_for_hf` writes it and one model.safetensors (timm loads
        no shards; save_file writes no metadata)."""
        if self.family.library == "timm":
            self.family.save_config(self.new, folder)
            return {"model.safetensors": list(self.outputs)}, None, None
        # The config half of save_pretrained, run on the meta model with no tensors: config.json gets
        # its dtype and architectures, and generation_config.json is written, exactly as the in-memory
        # path's save does. First, because save_pretrained removes shard files it did not write.
        self.new.save_pretrained(folder, state_dict={})
        files, index = shard_files(self.outputs, self.checkpoint.shard_bytes, self.new.num_parameters())
        return files, index, {"format": "pt"}


def shard_files(outputs: dict[str, torch.Tensor], shard_bytes: int | None,
                total_parameters: int) -> tuple[dict[str, list[str]], dict | None]:
    """The shard files (file name -> tensor names) and index (None for one file) save_pretrained writes
    for these tensors, at most `shard_bytes` a shard (None: save_pretrained's default)."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    # huggingface_hub plans the shards from the tensors' sizes; the meta tensors are enough for that. Its
    # torch front end (split_torch_state_dict_into_shards) gives the same split for meta tensors (no
    # storage ids, sizes numel x item size) but imports torch.distributed.tensor for its size (0.7 s).
    split = split_state_dict_into_shards_factory(outputs, get_storage_size=lambda t: t.numel() * t.element_size(),
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=shard_bytes or SAVE_PRETRAINED_SHARD)
    if not split.is_sharded:
        return split.filename_to_tensors, None
    # as save_pretrained writes it
    return split.filename_to_tensors, {"metadata": {"total_parameters": total_parameters, **split.metadata},
                                       "weight_map": split.tensor_to_filename}


class Checkpoint:
    """A folder's safetensors weights, read lazily: names, shapes and dtypes from the file headers,
    each tensor when it is asked for."""

    def __init__(self, folder: Path, name: str, sharded: bool = True):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if sharded and not (self.folder / "model.safetensors").exists() and index.is_file():
            _refuse_pickle_shards(self.folder, index)
        # Inside the folder, readable, no pickles: the in-memory path's checks, with its messages.
        files = safetensors_weights(self.folder, name, sharded=sharded)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    if key in self.where:
                        raise fail("model", path, f"holds {key}, which {self.where[key].name} holds too", FIX)
                    part = f.get_slice(key)
                    self.where[key], self.shapes[key], self.dtypes[key] = path, tuple(part.get_shape()), part.get_dtype()
        if len(files) > 1:
            weight_map = json.loads(index.read_text())["weight_map"]  # read and checked by safetensors_weights
            for key, file in weight_map.items():
                if self.where.get(key, self.folder / file).name != Path(file).name:
                    raise fail("model", self.folder / file, f"does not hold {key}, which {INDEX} places in it", FIX)
        # Output shards of the source's shard size: its largest shard (None for one file: transformers' default).
        self.shard_bytes = max(path.stat().st_size for path in files) if len(files) > 1 else None

    def check(self, expected: dict[str, torch.Tensor]) -> None:
        """Refuse a tensor whose shape is not the model's, or whose dtype is not a number of the same kind."""
        for key, want in expected.items():
            path, shape, dtype = self.where[key], self.shapes[key], DTYPES.get(self.dtypes[key])
            if shape != tuple(want.shape):
                raise fail("model", path, f"holds {key} with shape {list(shape)}, but config.json gives "
                           f"{list(want.shape)}", FIX)
            if dtype is None or dtype.is_floating_point != want.dtype.is_floating_point:
                raise fail("model", path, f"holds {key} as {self.dtypes[key]}, but the model stores it as "
                           f"{str(want.dtype).removeprefix('torch.')}", FIX)

    def get(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor, in `dtype` (from_pretrained casts each tensor to its parameter's dtype too). The
        file is opened for this one tensor: safe_open maps the whole file, and the pages a read touches
        stay in the process's memory until the file is closed (opening takes well under a millisecond)."""
        from safetensors import safe_open

        with safe_open(str(self.where[key]), "pt") as f:
            return f.get_tensor(key).to(dtype)


def write_shard(path: Path, planned: dict[str, torch.Tensor], tensor_of, metadata: dict[str, str] | None) -> None:
    """One safetensors file, written tensor by tensor: the header from the planned (meta) tensors first,
    then each tensor's bytes as `tensor_of(name)` makes it. safetensors' own writers (save_file,
    serialize_file) need every tensor of the file in memory at once, which is what streaming avoids.
    `metadata`: the header's __metadata__ (None: none, as save_file writes without it)."""
    # Larger items first, as save_file orders them, so each tensor's bytes stay aligned to its item size.
    order = sorted(planned, key=lambda name: -planned[name].element_size())
    header, offset = {}, 0
    for name in order:
        t = planned[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            tensor = tensor_of(name)
            if tensor.shape != planned[name].shape or tensor.dtype != planned[name].dtype:
                raise fail("model", name, f"came out as {tensor.dtype} {list(tensor.shape)}, but the rebuilt "
                           f"model expects {planned[name].dtype} {list(planned[name].shape)}",
                           "report this model to reshape's issue tracker")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next one is made


def load_dtype(stored, checkpoint: Checkpoint) -> torch.dtype | None:
    """The dtype from_pretrained(dtype="auto") loads the model in: the config's (`stored`, a dtype or its
    name, e.g. "bfloat16"), else the weights' (None when they mix dtypes: transformers would take
    whichever floating tensor it met first)."""
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype):
        return stored
    floating = {DTYPES[d] for d in checkpoint.dtypes.values() if d in DTYPES and DTYPES[d].is_floating_point}
    return floating.pop() if len(floating) == 1 else None


@contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def skeleton(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device, with the dtypes from_pretrained gives its parameters (it builds
    the model under the load dtype too). The config is copied: building may write into it."""
    with _default_dtype(dtype):
        return spec.family.build(ModelSpec(spec.family, copy.deepcopy(spec.config), spec.cls), empty=True)


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the family's save writes for `model` (meta tensors here): for transformers,
    save_pretrained's, its state dict less the keys it ignores on save and the tied copies; for timm,
    save_for_hf's, its whole state dict."""
    from transformers import PreTrainedModel
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    if not isinstance(model, PreTrainedModel):
        return state
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, model)


def layers_prefix(model: nn.Module, family) -> str:
    """The state-dict prefix of the block stack, e.g. 'model.layers.' (as pipeline.rebuild finds it)."""
    layers = family.layers(model)
    return next(f"{name}." if name else "" for name, module in model.named_modules() if module is layers)


def layer_plan(family, plan: Plan) -> Plan:
    """The plan the block transfer follows: a shared block (ALBERT) is transferred once, whatever the
    depth (its repeat count, set by the config)."""
    return replace(plan, keep=(0,)) if family.shared_layers else plan


def _sources(checkpoint: Checkpoint, prefix: str, keep: tuple[int, ...],
             outputs: dict[str, torch.Tensor]) -> dict[str, str | tuple[int, str]]:
    """Where each output tensor comes from: a source tensor's name, or (new block index, name in the
    block). Output tensors with no source are left out (the caller compares the key sets)."""
    sources: dict[str, str | tuple[int, str]] = {}
    for name in outputs:
        if name.startswith(prefix):
            index, rel = name[len(prefix):].split(".", 1)
            if int(index) < len(keep) and f"{prefix}{keep[int(index)]}.{rel}" in checkpoint.shapes:
                sources[name] = (int(index), rel)
        elif name in checkpoint.shapes:
            sources[name] = name
    return sources


def _inherits(family, method: str, base: type) -> bool:
    """Whether `family` uses `base`'s `method` as it is (not overridden, nor replaced on the instance)."""
    return getattr(getattr(family, method), "__func__", None) is getattr(base, method)


def _converts_weights(model: nn.Module) -> bool:
    """Whether save_pretrained would rename or convert this model's weights (transformers' conversion
    mapping for the class, as it applies to a model built from its config, as the new one is)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    return any(not isinstance(c, PrefixChange) for c in get_model_conversion_mapping(model, add_legacy=False))


def _keeps_fp32(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether from_pretrained loads some modules in float32 whatever the checkpoint says."""
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) and dtype in (torch.float16, torch.bfloat16)
    return bool(strict or (getattr(model, "_keep_in_fp32_modules", None) and dtype == torch.float16))


def _refuse_pickle_shards(folder: Path, index: Path) -> None:
    """An index that names pickle shards (a .bin among .safetensors) is refused like a pickle folder."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # safetensors_weights reports an unreadable index
    pickles = [n for n in names if isinstance(n, str) and Path(n).suffix in PICKLES]
    if pickles:
        raise fail("model", folder / pickles[0], f"is a pickle shard named by {INDEX}, which reshape never loads "
                   "(unpickling can run code)", "if you trust the file, load the model with transformers and save "
                   "it again with save_pretrained, which writes safetensors shards")
