"""What a model family adapter must tell reshape. Adapters hold accessors and weight maps, no algorithms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import Problem, fail
from ..plan import Plan, Shape


@dataclass(frozen=True)
class Proj:
    """A linear projection inside a block, named relative to the block."""

    name: str
    # For attention inputs: which of q/k/v its output rows hold, in order (fused qkv holds all three).
    roles: tuple[str, ...] = ()
    # GPT-2's Conv1D stores its weight as [in, out] instead of nn.Linear's [out, in].
    conv1d: bool = False


@dataclass(frozen=True)
class BlockWeights:
    """Where a block's projections live: the weight map the transfer algorithms work on."""

    attn_in: tuple[Proj, ...]
    attn_out: Proj
    mlp_in: tuple[Proj, ...]  # fc1, or gate and up for gated MLPs
    mlp_out: Proj
    # Per-head parameters, e.g. XCiT's temperature: each new head takes its parent head's.
    per_head: tuple[str, ...] = ()
    per_head_axis: int = 0  # their heads axis (Swin's relative position bias table has heads last)
    # Fused Q/K/V rows grouped per KV head as [q heads of the group, k, v] (GPT-NeoX, BLOOM, Falcon),
    # instead of [all q; all k; all v].
    interleaved: bool = False


@dataclass
class ModelSpec:
    """A model known by its family and config, before or without its weights."""

    family: Family
    config: Any  # a transformers PretrainedConfig, or a timm {"architecture", "model_args"} dict
    cls: type | None = None  # the transformers class to build; None for timm


def config_count(config: Any, key: str) -> int:
    """A head, layer or width count read from a model's config. Zero or negative means the source itself
    is broken, which must not be blamed on the user's plan (nor crash in a division)."""
    value = config.get(key) if isinstance(config, dict) else getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"config.json {key}", value, "must be a whole number of at least 1, so the source model is broken "
                   "(not the plan)", "fix the source's config.json or re-download the model")
    return value


def head_dim_of(config: Any, hidden_key: str, heads_key: str) -> int:
    """The head dim of a config without a head_dim key: the width split evenly between the heads."""
    hidden, heads = config_count(config, hidden_key), config_count(config, heads_key)
    if hidden % heads:
        raise fail(f"config.json {heads_key}", heads, f"does not divide {hidden_key} {hidden}, so the source model "
                   "is broken (not the plan)", "fix the source's config.json or re-download the model")
    return hidden // heads


class Family(ABC):
    name: str
    covers: str  # what it covers, for the list shown when no family claims a model
    weights: BlockWeights
    can_widen_attention: bool  # can the saved config express attention width != model width?
    library: str  # "transformers" or "timm": what loads the saved folder
    can_split_aware: bool = True  # does the function-aware head split apply (no rotary positions)?
    # One block run num_hidden_layers times (ALBERT): depth sets the repeat count, there are no layers to drop.
    shared_layers: bool = False
    # Several block stacks ("stages"), each planned apart (hierarchical models, encoder-decoders; see
    # reshape/stages.py): `shape` gives a StagedShape, plans are StagedPlans, `stage_prefixes` places the stacks.
    staged: bool = False
    # Plan options the family cannot carry out, each with the reason (e.g. {"mlp": "..."}): refused by name.
    refuses: dict[str, str] = {}

    @abstractmethod
    def claims(self, obj: Any) -> bool:
        """True if this adapter handles this config or module."""

    @abstractmethod
    def spec(self, model: nn.Module) -> ModelSpec:
        """The spec of an in-memory model."""

    @abstractmethod
    def shape(self, config: Any) -> Shape: ...

    @abstractmethod
    def layers(self, model: nn.Module) -> nn.Module:
        """The block stack (a ModuleList or Sequential), indexable by layer."""

    @abstractmethod
    def new_config(self, config: Any, shape: Shape, plan: Plan) -> Any: ...

    @abstractmethod
    def build(self, spec: ModelSpec, empty: bool) -> nn.Module:
        """A model of this spec: with meta parameters when `empty` (to be assigned), else freshly initialised."""

    @abstractmethod
    def embedding_modules(self, model: nn.Module) -> list[nn.Module | nn.Parameter]:
        """Modules and loose parameters counted as embeddings."""

    @abstractmethod
    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None:
        """Write a folder that the family's own library loads: config.json and model.safetensors."""

    def inner_shape(self, config: Any) -> Shape | None:
        """The shape of a second attention inside each block with its own head count (TNT's pixel-level
        attention; `--inner-heads`), or None."""
        return None

    def config_problem(self, config: Any) -> str | None:
        """Why the family's own library would refuse this config when loading it, or None."""
        return None

    def needs_reshape(self, config: Any) -> str | None:
        """Why a saved folder of this config loads only through reshape.load, not with the family's own
        library alone, or None (most families). The card says how to load it, and push refuses it, from this.
        E.g. XCiT's attention wider than timm builds: "attn_head_dim in config.json: ..."."""
        return None

    def own_config(self, saved: dict) -> dict:
        """reshape's own keys in a saved timm config.json that rebuilding the model needs (timm reads only
        architecture and model_args), to carry into the config read from the folder; {} for most families.
        E.g. XCiT's attn_head_dim. (A transformers config keeps every key of its own accord.)"""
        return {}

    def resolve(self, obj: Any) -> "Family":
        """The adapter for this particular model (the generic transformers adapter reads it from the structure)."""
        return self

    def decoder_only(self, config: Any) -> bool:
        """Whether the model is a decoder-only language model, whose layers `--select late` drops by default."""
        return False

    def align_plan(self, shape: Shape, plan: Plan) -> Plan:
        """The plan with its evenly spread layers moved where the family needs them (Twins-SVT: each kept
        block on a position of its own attention kind); called only for the default uniform selection."""
        return plan

    def plan_problem(self, shape: Shape, plan: Plan) -> Problem | None:
        """Why the family cannot carry out this plan, or None."""
        return None

    def outside_per_head(self, model: nn.Module) -> dict[str, int]:
        """Per-head tensors outside the block stack (state key -> heads axis), e.g. MPNet's shared
        relative attention bias: each new head takes its parent head's entry."""
        return {}

    def adjust_block(self, layer: dict, shape: Shape, plan: Plan) -> dict:
        """One kept block's new tensors (names relative to the block) after the generic transfer, with any
        rule of the family's own applied (e.g. CaiT's talking-heads mixers, whose columns and scales follow
        the new heads). Both the in-memory and the streaming conversion call it once per kept block."""
        return layer

    def block_weights(self, block: nn.Module) -> BlockWeights:
        """The weight map of this one block. Families whose blocks come in two kinds (Twins' local and
        global attention, ConViT's GPSA and MHSA) map the projections of each kind, for the report's count."""
        return self.weights

    def stage_prefixes(self, model: nn.Module) -> list[str]:
        """A staged family's stacks: where each one's blocks live in the state dict, in stage order. A family
        with one block stack has `layers` instead."""
        raise NotImplementedError(f"{self.name} has one block stack, not stages")

    def finalize(self, model: nn.Module) -> None:
        """Restore what assigning a state dict undoes (e.g. tied weights)."""


@contextmanager
def meta_parameters():
    """accelerate's init_empty_weights(include_buffers=False): parameters built on the meta device. Imported
    on first use: accelerate takes a quarter of a second to import, and converting from config.json
    (reshape/config_convert.py) builds no model."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield
