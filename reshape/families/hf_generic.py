"""Any transformers model whose structure follows the common conventions, found from the model itself.

transformers adds architectures every month; a hand-written adapter per model type never keeps up.
This adapter reads the structure instead (on a skeleton built on the meta device from the config):

- the block stack: the ModuleList of identical blocks whose length is the config's layer count (two
  for encoder-decoders: the encoder's and the decoder's);
- the attention projections, by the naming conventions below, checked against the config's head
  counts and widths; fused Q/K/V projections laid out as [q; k; v], or interleaved per KV group;
- the MLP projections (plain or gated) whose width is the config's MLP width;
- per-head tensors: relative position bias tables and scales, whose children inherit the parent's
  entry; q/k norms over the head dim (keep-head-dim only) or over the whole width;
- per-layer config lists (`layer_types`, ...), which follow the kept layers.

What the structure cannot tell is declared per model type in DECLARED (interleaved fused layouts,
config rules); what cannot be done is refused with a one-line reason. Rebuilding goes through the
model's own config and class, so every output loads with plain `from_pretrained`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..errors import Problem, fail
from ..plan import Shape, target_shape
from ..stages import StagedShape
from .base import BlockWeights, Proj, config_count, head_dim_of
from .hf import ConfigKeys, HFFamily

# Attention projections by convention: (q, k, v) names, fused names, output names.
SEPARATE_QKV = [("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
                ("query_proj", "key_proj", "value_proj"), ("q", "k", "v"), ("wq", "wk", "wv"), ("Wq", "Wk", "Wv"),
                ("project_q", "project_k", "project_v")]
FUSED_QKV = ("qkv_proj", "qkv", "Wqkv", "c_attn", "query_key_value", "in_proj", "W_pack")
OUT_NAMES = ("o_proj", "out_proj", "dense", "out_lin", "o", "c_proj", "Wo", "wo", "proj", "output.dense",
             "attention_out", "projection_layer", "output_projection", "output")
# MLP projections: (inputs, output); a gated MLP has two inputs of the same width.
MLP_NAMES = [(("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("intermediate.dense",), "output.dense"),
             (("c_fc",), "c_proj"), (("fc_in",), "fc_out"), (("lin1",), "lin2"), (("dense_h_to_4h",), "dense_4h_to_h"),
             (("wi",), "wo"), (("w1", "w3"), "w2"), (("ffn",), "ffn_output"), (("w_in.w_0", "w_in.w_1"), "w_out"),
             (("0",), "2")]  # the last: Sequential(Linear, activation, Linear), as in CTRL
MLP_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff", "ffn_hidden_size", "dff", "dim_ff")
# Names of per-head tensors that a child head inherits from its parent head.
PER_HEAD_HINTS = ("relative_attention_bias", "relative_position_bias_table", "temperature", "head_scale",
                  "sinks", "slope_rate")  # attention-sink logits (gpt-oss) and ALiBi-like slopes (MiniMax)
QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_layernorm", "key_layernorm"))
GATE_NAMES = ("gate_proj", "g_proj")  # a gate on the attention's output features, inside the attention


@dataclass(frozen=True)
class Declared:
    """What a model type's structure does not show."""

    # Fused Q/K/V rows grouped per KV head as [q heads of the group, k, v] (per head when KV = heads).
    interleaved: bool = False
    mlp_ratio: int | None = None  # MLP width / hidden when the config stores no MLP width
    fixed_heads: str = ""  # why the head count cannot change (a function that pairs or orders heads)


DECLARED = {
    "gpt_neox": Declared(interleaved=True),
    "bloom": Declared(interleaved=True, mlp_ratio=4),
    "deberta": Declared(interleaved=True),
    "falcon": Declared(interleaved=True),
    # Differential attention subtracts one softmax map from another, and its lambdas are learnt over the
    # head dim: neither a keep-width re-reading nor copied heads (checked: the outputs change) keep it.
    "diffllama": Declared(fixed_heads="its differential attention pairs two softmax maps per head"),
}


class Unsupported(Exception):
    """The structure did not match: the message names what was looked for and not found."""


def _skeleton(config, cls=None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    with no_init_weights(), init_empty_weights(include_buffers=False):
        model = cls(config) if cls is not None else AutoModel.from_config(config)
    return model.base_model


def _linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, conv1d) of a linear projection, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.ndim == 2 and isinstance(getattr(module, "in_features", None), int) \
            and weight.shape == (getattr(module, "out_features", None), module.in_features):
        return module.in_features, module.out_features, False  # a Linear by another class (I-BERT's QuantLinear)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2's [in, out] layout
        return module.weight.shape[0], module.nf, True
    return None


def _child(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _config_value(config, *names):
    data = config.to_dict()
    for name in names:
        if name in data or name in getattr(config, "attribute_map", {}):
            try:
                return name, getattr(config, name, None)
            except Exception as e:  # e.g. Gemma 4: a per-layer value has no global reading
                raise Unsupported(f"its config cannot give one {name} ({type(e).__name__})") from None
    return None, None


@dataclass
class Found:
    """The result of reading one block."""

    attn_in: tuple[Proj, ...]
    attn_out: Proj
    heads: int
    kv_heads: int
    head_dim: int
    mlp_in: tuple[Proj, ...] = ()
    mlp_out: Proj | None = None
    mlp: int = 0
    per_head: list[tuple[str, int]] = field(default_factory=list)
    head_norms: list[str] = field(default_factory=list)  # q/k norms and other tensors over the head dim
    width_norms: list[Proj] = field(default_factory=list)  # q/k norms over all heads
    moe: bool = False
    gated: bool = False  # an output gate among attn_in


def read_block(block: nn.Module, heads: int, kv_heads: int, hidden: int, mlp_width: int | None,
               where: str) -> Found:
    """Find the attention (the first match: the self-attention) and the MLP of one block."""
    found = None
    for parent_name, parent in block.named_modules():
        found = _attention(block, parent, parent_name, heads, kv_heads, hidden)
        if found:
            break
    if found is None:
        raise Unsupported(f"no Q/K/V projections found under {where} (looked for "
                          f"{', '.join('/'.join(n) for n in SEPARATE_QKV[:3])} or a fused {'/'.join(FUSED_QKV[:5])} "
                          f"with {heads} heads)")
    _per_head_tensors(block, found)
    _mlp(block, found, hidden, mlp_width)
    return found


def _attention(root: nn.Module, parent: nn.Module, pname: str, heads: int, kv_heads: int, hidden: int) -> Found | None:
    prefix = f"{pname}." if pname else ""
    candidates = []
    for names in SEPARATE_QKV:
        dims = [_linear_dims(_child(parent, n)) if _child(parent, n) is not None else None for n in names]
        if all(dims) and dims[0][0] == hidden:
            q_out, kv_out = dims[0][1], dims[1][1]
            if q_out % heads == 0 and dims[2][1] == kv_out and kv_out * heads == q_out * kv_heads:
                conv = dims[0][2]
                attn_in = tuple(Proj(prefix + n, (role,), conv1d=conv) for n, role in zip(names, "qkv"))
                candidates.append((attn_in, q_out, q_out // heads))
    for name in FUSED_QKV:
        module = _child(parent, name)
        dims = _linear_dims(module) if module is not None else None
        if dims and dims[0] == hidden and dims[1] % (heads + 2 * kv_heads) == 0:
            head_dim = dims[1] // (heads + 2 * kv_heads)
            candidates.append(((Proj(prefix + name, ("q", "k", "v"), conv1d=dims[2]),), heads * head_dim, head_dim))
    # The output projection sits beside the inputs (most), or in a sibling of their module (BERT's
    # attention.self.query and attention.output.dense).
    places = [prefix]
    if pname:
        places.append(pname.rsplit(".", 1)[0] + "." if "." in pname else "")
    for attn_in, width, head_dim in candidates:
        for place in places:
            for out_name in OUT_NAMES:
                module = _child(root, place + out_name)
                dims = _linear_dims(module) if module is not None else None
                if dims and dims[0] == width and dims[1] == hidden and place + out_name not in {p.name for p in attn_in}:
                    return Found(attn_in, Proj(place + out_name, conv1d=dims[2]), heads, kv_heads, head_dim)
    return None


def _per_head_tensors(block: nn.Module, found: Found) -> None:
    q_prefix = found.attn_in[0].name.rsplit(".", 1)[0] + "." if "." in found.attn_in[0].name else ""
    _output_gate(block, found, q_prefix)
    _qk_norms(block, found, q_prefix)
    # Tensors of the attention itself beside its projections and norms: those with a heads axis are per
    # head (sinks, bias tables, Nystromformer's per-head convolution, gate biases), and a child head
    # inherits its parent's entry; tensors laid out over the head dim are learnt over it.
    taken = {proj.name for proj in (*found.attn_in, found.attn_out, *found.width_norms)} | set(found.head_norms)
    for name, p in block.named_parameters():
        module = name.rsplit(".", 1)[0]
        inside = bool(q_prefix) and name.startswith(q_prefix) and module not in taken
        if any(h in name for h in PER_HEAD_HINTS) and found.heads in p.shape:
            found.per_head.append((name, list(p.shape).index(found.heads)))
        elif inside and p.ndim and p.shape[-1] == found.head_dim and found.head_dim != found.heads:
            found.head_norms.append(name)  # e.g. DiffLlama's lambdas, VITS' relative position embeddings
        elif inside and found.heads in p.shape and found.heads not in (found.head_dim, found.heads * found.head_dim):
            found.per_head.append((name, list(p.shape).index(found.heads)))
    if len({axis for _, axis in found.per_head}) > 1:
        raise Unsupported(f"its per-head tensors ({', '.join(n for n, _ in found.per_head)}) put their heads on "
                          "different axes")


def _qk_norms(block: nn.Module, found: Found, q_prefix: str) -> None:
    """The first pair of q/k norms: over the head dim (or without weights), or over all heads' width."""
    for q_name, k_name in QK_NORMS:
        for prefix in (q_prefix, ""):
            q, k = _child(block, prefix + q_name), _child(block, prefix + k_name)
            if q is None or k is None or isinstance(q, nn.Identity):
                continue
            q_size = sum(p.numel() for p in q.parameters(recurse=False))
            if q_size == found.head_dim or q_size == 0:
                found.head_norms += [prefix + q_name, prefix + k_name]
            elif q_size == found.heads * found.head_dim:
                found.width_norms += [Proj(prefix + q_name, ("q",)), Proj(prefix + k_name, ("k",))]
            else:  # e.g. one norm per head: neither rule applies
                raise Unsupported(f"its q/k norm {prefix + q_name} has {q_size} parameters, neither the head dim "
                                  f"{found.head_dim} nor the attention width")
            return


def _output_gate(block: nn.Module, found: Found, q_prefix: str) -> None:
    """A gate on each attention output feature inside the attention module (AFMoE's
    sigmoid(gate_proj(x)) * attention): its rows follow the query heads'."""
    for name in GATE_NAMES if q_prefix else ():  # at block level, gate_proj is the MLP's
        module = _child(block, q_prefix + name)
        dims = _linear_dims(module) if module is not None else None
        if dims and dims[1] == found.heads * found.head_dim:
            found.attn_in += (Proj(q_prefix + name, ("q",), conv1d=dims[2]),)
            found.gated = True
            return


def _mlp(block: nn.Module, found: Found, hidden: int, width: int | None) -> None:
    found.moe = any("expert" in name for name, _ in block.named_modules())
    for ins, out in MLP_NAMES:
        for parent_name, parent in block.named_modules():
            if "expert" in parent_name:
                continue
            prefix = f"{parent_name}." if parent_name else ""
            modules = [_child(parent, n) for n in (*ins, out)]
            if any(m is None for m in modules):
                continue
            dims = [_linear_dims(m) for m in modules]
            if not all(dims):
                continue
            inner = dims[-1][0]
            if width is not None and inner != width:
                continue
            if all(d[0] == hidden and d[1] == inner for d in dims[:-1]) and dims[-1][1] == hidden:
                found.mlp_in = tuple(Proj(prefix + n, conv1d=d[2]) for n, d in zip(ins, dims))
                found.mlp_out = Proj(prefix + out, conv1d=dims[-1][2])
                found.mlp = inner
                return


class GenericFamily(HFFamily):
    """An HFFamily whose weight map and config keys were read from the model's structure."""

    def __init__(self, model_type: str, layers_path: str, weights: BlockWeights, embeddings: list[str],
                 keys: ConfigKeys, found: Found, can_widen_attention: bool, can_split_aware: bool, refuses: dict[str, str], mlp_default: int):
        super().__init__(f"auto:{model_type}", f"any transformers model with a standard layout ({model_type})",
                         [model_type], layers_path, weights, embeddings, keys=keys,
                         can_widen_attention=can_widen_attention, can_split_aware=can_split_aware)
        self.found = found
        self.refuses = refuses
        self.mlp_default = mlp_default
        self.outside: list[tuple[str, int]] = []  # per-head tensors outside the stack (name under base, axis)
        self.first_block_differs = ""  # a parameter that layer 0 lacks or alone has (ModernBERT's attn_norm)
        self.outside_head_dim: list[str] = []  # tensors outside the stack over the head dim
        self.fixed_heads = ""  # DECLARED: why the heads cannot change

    def shape(self, config) -> Shape:
        k = self.keys
        heads, hidden = config_count(config, k.heads), config_count(config, k.hidden)
        kv = getattr(config, k.kv_heads, None) if k.kv_heads else None
        head_dim = getattr(config, k.head_dim, None) if k.head_dim else None
        return Shape(layers=config_count(config, k.layers), heads=heads,
                     kv_heads=kv or self.found.kv_heads * heads // self.found.heads,
                     head_dim=head_dim or head_dim_of(config, k.hidden, k.heads), hidden=hidden,
                     mlp=getattr(config, k.mlp, None) or self.mlp_default)

    def plan_problem(self, shape: Shape, plan) -> Problem | None:
        if self.fixed_heads and plan.heads != shape.heads:
            return Problem("heads", plan.heads, f"changes the head count, and {self.fixed_heads}",
                           f"keep {shape.heads} heads (change only --depth)")
        over_head_dim = self.found.head_norms + self.outside_head_dim
        if over_head_dim and plan.head_mode == "keep-width" and plan.heads != shape.heads:
            norms = all("norm" in name for name in over_head_dim)
            return Problem("heads", plan.heads, f"changes the head dim {shape.head_dim} in keep-width mode, and the "
                           f"{'q/k norms' if norms else 'tensors'} ({', '.join(over_head_dim)}) are laid out "
                           "over the head dim",
                           f"pass --keep-head-dim, or keep {shape.heads} heads" if self.can_widen_attention
                           else f"keep {shape.heads} heads (its config cannot widen the attention either)")
        if self.first_block_differs and 0 not in plan.keep:
            return Problem("keep", ",".join(map(str, plan.keep)), f"drops layer 0, whose block differs from the others "
                           f"({self.first_block_differs}), so no other layer can take its place",
                           "keep layer 0 (--select uniform or first, or list 0 in --keep)")
        return None

    def new_config(self, config, shape, plan):
        try:
            new = super().new_config(config, shape, plan)
        except Exception as e:  # a config class that will not take the new numbers (e.g. read-only properties)
            raise fail("model", f"model_type {config.model_type!r}", f"its config could not be rewritten "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                       "open an issue at reshape's tracker with the model's config.json") from None
        _follow_kept_layers(new, shape, plan, target_shape(shape, plan))
        if getattr(config, "attention_types", None) is not None and hasattr(config, "attention_layers"):
            # GPT-Neo stores its per-layer pattern compressed; write the kept layers out one by one.
            kinds = [config.attention_layers[i] for i in plan.keep]
            new.attention_types = [[[kind], 1] for kind in kinds]
            new.attention_layers = kinds
        if hasattr(new, "set_output_features_output_indices") and len(new.stage_names or []) == shape.layers + 1:
            _keep_backbone_stages(new, plan.keep)
        return new

    def outside_per_head(self, model) -> dict[str, int]:
        base = model.base_model
        prefix = next((f"{name}." for name, m in model.named_modules() if m is base and name), "")
        return {prefix + name: axis for name, axis in self.outside}


# Which layers are dense and which mixture-of-experts, said as "the first k are dense".
DENSE_PREFIX_KEYS = ("first_k_dense_replace", "num_dense_layers")


def _follow_kept_layers(new, shape: Shape, plan, target: Shape) -> None:
    """Rewrite the config's per-layer facts for the kept layers, in place: per-layer lists (layer_types,
    mlp_layer_types, Longformer's attention_window, per-layer head counts, ...), lists of layer indices
    (moe_layers, mlp_only_layers) and counts of leading dense layers. A rule this misses shows up as
    blocks that do not match their source, which the transfer refuses in one line."""
    keep, layers = plan.keep, shape.layers
    for key, values in new.to_dict().items():
        if not isinstance(values, list) or key in ("layer_types", "architectures") or layers < 2:
            continue
        if key.endswith("layers") and _is_index_list(values, layers):
            setattr(new, key, [at for at, old in enumerate(keep) if old in values])
        elif len(values) == layers:
            kept = [values[i] for i in keep]
            if "heads" in key:  # per-layer head counts (Laguna) take the plan's, as the single count does
                count = target.kv_heads if "key_value" in key or "kv" in key else target.heads
                kept = [count] * len(kept)
            setattr(new, key, kept)
    for key in DENSE_PREFIX_KEYS:
        if isinstance(getattr(new, key, None), int):
            setattr(new, key, sum(old < getattr(new, key) for old in keep))
    start, end = getattr(new, "moe_layer_start_index", None), getattr(new, "moe_layer_end_index", None)
    if isinstance(start, int) and isinstance(end, int) and getattr(new, "moe_layer_interval", 1) == 1:
        # ERNIE 4.5: layers start..end are mixture-of-experts (end may be -1: to the last layer)
        end = layers - 1 if end < 0 else end
        new.moe_layer_start_index = sum(old < start for old in keep)
        new.moe_layer_end_index = sum(old <= end for old in keep) - 1


def _says_layer_kinds(config) -> bool:
    """Whether the config names which layers are dense and which mixture-of-experts."""
    data = config.to_dict()
    layers = config.num_hidden_layers
    return (any(isinstance(data.get(key), int) for key in (*DENSE_PREFIX_KEYS, "moe_layer_start_index"))
            or isinstance(data.get("mlp_layer_types"), list)
            or any(key.endswith("layers") and isinstance(v, list) and v and _is_index_list(v, layers)
                   for key, v in data.items()))


def _is_index_list(values: list, layers: int) -> bool:
    """Sorted distinct layer indices (e.g. moe_layers [1, 3, 5]), not a per-layer list of flags."""
    return (all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and values == sorted(set(values)) and all(0 <= v < layers for v in values)
            and not (len(values) == layers and len(set(values)) == 1))


def _tables(base: nn.Module):
    """(name, tensor) of the saved tensors that are not a projection's or convolution's weights: the
    place for position tables and other values laid out over a model dimension."""
    for module_name, module in base.named_modules():
        if _linear_dims(module) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        prefix = f"{module_name}." if module_name else ""
        tensors = {**module._parameters, **{k: v for k, v in module._buffers.items()
                                            if k not in module._non_persistent_buffers_set}}
        yield from ((prefix + name, t) for name, t in tensors.items() if t is not None)


def _keep_backbone_stages(config, keep) -> None:
    """A backbone config names one stage per layer and lists the stages it outputs: renumber both."""
    new_index = {old + 1: new + 1 for new, old in enumerate(keep)}
    new_index[0] = 0  # the stem
    out = [new_index[i] for i in config.out_indices or [] if i in new_index] or None
    config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(keep) + 1)]
    config.set_output_features_output_indices(None, out)


def _embeddings(base: nn.Module, stack_paths: list[str]) -> list[str]:
    if isinstance(getattr(base, "embeddings", None), nn.Module):
        return ["embeddings"]
    names = []
    for name, module in base.named_modules():
        if isinstance(module, nn.Embedding) and not any(name.startswith(p + ".") for p in stack_paths):
            names.append(name)
    return names


def _stack(base: nn.Module, layers: int) -> list[str]:
    paths = []
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and layers > 0:
            if len({type(m) for m in module}) == 1:
                paths.append(name)
    return paths


def discover(config, cls=None) -> GenericFamily:
    """The adapter for this config's structure; raises Unsupported with the reason."""
    model_type = config.model_type
    declared = DECLARED.get(model_type, Declared())
    if getattr(config, "is_encoder_decoder", False):
        return discover_seq2seq(config, cls)
    heads_key, heads = _config_value(config, "num_attention_heads")
    layers_key, layers = _config_value(config, "num_hidden_layers")
    hidden_key, hidden = _config_value(config, "hidden_size")
    if not all(isinstance(v, int) and v > 0 for v in (heads, layers, hidden)):
        raise Unsupported("its config has no single num_attention_heads / num_hidden_layers / hidden_size "
                          f"(found {heads!r}, {layers!r}, {hidden!r})")
    kv_key, kv = _config_value(config, "num_key_value_heads", "num_kv_heads")
    if kv_key and getattr(config, "attribute_map", {}).get(kv_key) == getattr(config, "attribute_map", {}).get(
            heads_key, heads_key):
        kv_key = None  # an alias of the head count, not its own number
    if kv_key and not getattr(config, "new_decoder_architecture", True):
        kv_key = None  # Falcon's classic layout reads one KV head (multi_query) or one per head
    kv = kv if kv_key and isinstance(kv, int) else heads
    if model_type == "falcon" and not config.new_decoder_architecture:
        kv = 1 if config.multi_query else heads
        if config.multi_query:
            raise Unsupported("its single shared key/value head (multi_query) cannot follow a new head count; "
                              "only the new_decoder_architecture layout can")
    base = _skeleton(config, cls)
    shared = getattr(config, "num_hidden_groups", None) is not None  # ALBERT: one block run L times
    if shared and (config.num_hidden_groups, getattr(config, "inner_group_num", 1)) != (1, 1):
        raise Unsupported(f"its {config.num_hidden_groups} layer groups of {config.inner_group_num} shared layers "
                          "would have to be regrouped; only one shared layer (as in every released ALBERT) is rebuilt")
    paths = _stack(base, 1 if shared else layers)
    if not paths:
        raise Unsupported(f"no ModuleList of {layers} identical blocks found (the config's num_hidden_layers)")
    mlp_key, mlp_value = _config_value(config, *MLP_KEYS)
    errors = []
    for path in paths:
        # The first block with attention: in a hybrid stack, blocks of other kinds (convolutions,
        # linear attention, state-space layers) come between them, and keep their own shapes.
        for index, block in enumerate(base.get_submodule(path)):
            try:
                found = read_block(block, heads, kv, hidden, mlp_value if isinstance(mlp_value, int) else None,
                                   f"{path}.{index}")
                break
            except Unsupported as e:
                errors.append(str(e))
        else:
            continue
        paths = [path]
        break
    else:
        raise Unsupported(errors[0])
    for block in list(base.get_submodule(paths[0]))[1:]:  # hybrid stacks: per-head tensors of other kinds
        for name, p in block.named_parameters():
            if any(h in name for h in PER_HEAD_HINTS) and heads in p.shape and name not in dict(found.per_head):
                found.per_head.append((name, list(p.shape).index(heads)))
    head_dim_key, head_dim_value = _config_value(config, "head_dim", "dim_head")
    if not isinstance(head_dim_value, int) or isinstance(getattr(type(config), "head_dim", None), property):
        head_dim_key = None
    elif head_dim_value != found.head_dim:
        raise Unsupported(f"its config's head_dim {head_dim_value} does not match its projections "
                          f"({found.head_dim} per head)")
    if head_dim_key is None and not found.width_norms and _reads_added_head_dim(config, cls, found, kv_key, paths[0]):
        head_dim_key = "head_dim"  # not in its config.json, but its modeling code reads one when given
    refuses = {}
    if found.moe:
        refuses["mlp"] = "would slice the experts of a mixture-of-experts MLP, which reshape copies unchanged"
    elif found.mlp_out is None:
        refuses["mlp"] = "found no MLP projections of the config's MLP width in its blocks"
    elif mlp_key is None or (mlp_value is None and declared.mlp_ratio is None):
        refuses["mlp"] = "its config has no MLP width to set"
    mlp_default = found.mlp or (declared.mlp_ratio or 4) * hidden
    # per-head tensors outside the stack (MPNet's shared relative attention bias)
    outside = [(name, list(p.shape).index(heads)) for name, p in base.named_parameters()
               if not name.startswith(paths[0] + ".") and any(h in name for h in PER_HEAD_HINTS) and heads in p.shape]
    # The aware split fits the plain score form x^T Wq^T Wk x: nothing per head, no norms, no positions inside it.
    plain_scores = not (found.per_head or outside or found.head_norms or found.width_norms or found.gated
                        or declared.interleaved
                        or _has_positional_attention(config, base))
    aware = plain_scores and not shared and kv == heads and base.main_input_name in ("input_ids", "pixel_values")
    weights = BlockWeights(attn_in=found.attn_in, attn_out=found.attn_out,
                           mlp_in=found.mlp_in, mlp_out=found.mlp_out or Proj(""),
                           per_head=tuple(n for n, _ in found.per_head),
                           per_head_axis=found.per_head[0][1] if found.per_head else 0,
                           interleaved=declared.interleaved)
    keys = ConfigKeys(heads=heads_key, layers=layers_key, hidden=hidden_key, mlp=mlp_key or "intermediate_size",
                      kv_heads=kv_key, head_dim=head_dim_key)
    family = GenericFamily(model_type, paths[0], weights, _embeddings(base, paths), keys, found,
                           # a norm over all heads' width would have to grow with them
                           can_widen_attention=head_dim_key is not None and not found.width_norms,
                           can_split_aware=aware, refuses=refuses, mlp_default=mlp_default)
    family.shared_layers = shared
    family.fixed_heads = declared.fixed_heads
    # A first block unlike every other (ModernBERT's has no attention norm) cannot be replaced, unless
    # the config says which layers are of which kind (first_k_dense_replace, ...): then the rebuilt
    # config follows the kept layers instead.
    kinds = [frozenset(n for n, _ in block.named_parameters()) for block in base.get_submodule(paths[0])]
    if len(kinds) > 1 and kinds[0] not in kinds[1:] and not _says_layer_kinds(config):
        family.first_block_differs = ", ".join(sorted(kinds[0] ^ kinds[1]))
    family.outside = outside
    # Tensors outside the stack laid out over the head dim (RoFormer's sinusoids, MLCD's class rotary
    # angles): a keep-width head change would change their size.
    family.outside_head_dim = [name for name, t in _tables(base)
                               if not name.startswith(paths[0] + ".") and t.is_floating_point() and t.ndim <= 2
                               and t.shape[-1] in (found.head_dim, found.head_dim // 2) and t.shape[-1] != hidden]
    return family


# Encoder-decoders: per stack, the config keys of (layers, heads, MLP width).
SEQ2SEQ_KEYS = [
    (("encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"),
     ("decoder_layers", "decoder_attention_heads", "decoder_ffn_dim")),  # BART, Whisper, Marian, mBART, ...
    (("num_layers", "num_heads", "d_ff"), ("num_decoder_layers", "num_heads", "d_ff")),  # T5, mT5, LongT5
]


class Seq2SeqFamily(GenericFamily):
    """An encoder-decoder: two block stacks, planned like the stages of a hierarchical model
    (`--depth ENC,DEC --heads ENC,DEC`, see reshape/stages.py). Cross-attention takes the decoder's
    head count. Heads are re-read at the same width (keep-width, contiguous); the per-head relative
    attention bias (T5, in each stack's first block) follows its parent heads."""

    staged = True

    def __init__(self, model_type, stacks, stack_keys, hidden_key, weights, embeddings, found):
        super().__init__(model_type, stacks[0], weights, embeddings, ConfigKeys(), found,
                         can_widen_attention=False, can_split_aware=False,
                         refuses={"mlp": "would slice the MLPs of two stacks, which reshape does not do for "
                                         "encoder-decoders"}, mlp_default=found.mlp)
        self.stacks = stacks  # paths from the base model, encoder first
        self.stack_keys = stack_keys
        self.hidden_key = hidden_key

    def shape(self, config) -> StagedShape:
        hidden = config_count(config, self.hidden_key)
        shapes = []
        for layers_key, heads_key, mlp_key in self.stack_keys:
            heads = config_count(config, heads_key)
            head_dim = getattr(config, "d_kv", None) or head_dim_of(config, self.hidden_key, heads_key)
            shapes.append(Shape(layers=config_count(config, layers_key), heads=heads, kv_heads=heads,
                                head_dim=head_dim, hidden=hidden, mlp=getattr(config, mlp_key)))
        return StagedShape(tuple(shapes))

    def stage_prefixes(self, model) -> list[str]:
        base = model.base_model
        prefix = next((f"{name}." for name, m in model.named_modules() if m is base and name), "")
        return [f"{prefix}{path}." for path in self.stacks]

    def layers(self, model):
        return nn.ModuleList([block for path in self.stacks for block in model.base_model.get_submodule(path)])

    def plan_problem(self, shape, plan) -> Problem | None:
        (enc_layers, enc_heads, _), (dec_layers, dec_heads, _) = self.stack_keys
        if enc_heads == dec_heads and plan.heads[0] != plan.heads[1]:
            return Problem("heads", ",".join(map(str, plan.heads)), f"differs between the stacks, and a "
                           f"{self.model_types[0]} config has one head count ({enc_heads}) for both",
                           f"give the same count twice, e.g. --heads {plan.heads[0]},{plan.heads[0]}")
        if self.found.per_head and any(0 not in stage.keep for stage in plan.stages):
            return Problem("depth", ",".join(map(str, plan.depth)), "drops a stack's first block, which holds the "
                           "relative attention bias that every block of the stack reads",
                           "keep each stack's first block (--select uniform or first)")
        return None

    def new_config(self, config, shape, plan):
        new = copy.deepcopy(config)
        for (layers_key, heads_key, _), stage, stage_shape in zip(self.stack_keys, plan.stages, shape.stages):
            setattr(new, layers_key, stage.depth)
            setattr(new, heads_key, stage.heads)
        if hasattr(new, "d_kv"):  # T5 states its head dim
            new.d_kv = target_shape(shape.stages[0], plan.stages[0]).head_dim
        # Per-layer lists follow their stack's kept layers (LED's attention_window: one per encoder layer).
        for key, values in new.to_dict().items():
            stage = 1 if "decoder" in key else 0
            if isinstance(values, list) and len(values) == shape.stages[stage].layers > 1 and key != "architectures":
                setattr(new, key, [values[i] for i in plan.stages[stage].keep])
        return new


def discover_seq2seq(config, cls=None) -> Seq2SeqFamily:
    data = config.to_dict()
    stack_keys = next((keys for keys in SEQ2SEQ_KEYS if all(k in data for pair in keys for k in pair)), None)
    hidden_key, hidden = _config_value(config, "hidden_size")
    if stack_keys is None or not isinstance(hidden, int):
        raise Unsupported("it is an encoder-decoder whose config names its layers and heads in no known way "
                          "(looked for encoder_layers/decoder_layers or num_layers/num_decoder_layers)")
    base = _skeleton(config, cls)
    stacks, found = [], None
    for name, (layers_key, heads_key, mlp_key) in zip(("encoder", "decoder"), stack_keys):
        layers, heads = getattr(config, layers_key), getattr(config, heads_key)
        paths = [p for p in _stack(base, layers) if p.startswith(name + ".")]
        if not paths:
            raise Unsupported(f"no ModuleList of {layers} identical blocks found in its {name} ({layers_key})")
        stack_found = read_block(base.get_submodule(paths[0])[0], heads, heads, hidden, getattr(config, mlp_key),
                                 f"{paths[0]}.0")
        stacks.append(paths[0])
        if found is None:
            found = stack_found
        else:  # the stacks may name their per-head tensors differently (LongT5's local encoder attention)
            found.per_head += [p for p in stack_found.per_head if p not in found.per_head]
    weights = BlockWeights(attn_in=found.attn_in, attn_out=found.attn_out, mlp_in=(), mlp_out=Proj(""),
                           per_head=tuple(n for n, _ in found.per_head),
                           per_head_axis=found.per_head[0][1] if found.per_head else 0)
    return Seq2SeqFamily(config.model_type, stacks, stack_keys, hidden_key, weights, _embeddings(base, stacks), found)


def _reads_added_head_dim(config, cls, found: Found, kv_key: str | None, stack: str) -> bool:
    """Whether the model's code reads a `head_dim` added to a config that has none (most decoders do,
    through getattr(config, "head_dim", hidden // heads)): build it with twice the heads at the same head
    dim and see. Its config.json then carries the key, so plain from_pretrained rebuilds the same model."""
    probe = copy.deepcopy(config)
    heads = config.num_attention_heads
    try:
        probe.num_attention_heads, probe.head_dim = 2 * heads, found.head_dim
        if kv_key:
            setattr(probe, kv_key, 2 * found.kv_heads)
        block = _skeleton(probe, cls).get_submodule(stack)[0]
        wide = read_block(block, 2 * heads, 2 * found.kv_heads, config.hidden_size, None, "the probe")
    except Exception:  # a config or model that will not take it: no wider attention
        return False
    return wide.head_dim == found.head_dim


def _has_positional_attention(config, base: nn.Module) -> bool:
    """Rotary, ALiBi or relative positions inside the attention scores: the aware split's score form
    x^T Wq^T Wk x does not describe them."""
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return True
    if getattr(config, "relative_attention", False) or getattr(config, "alibi", False):
        return True
    return any("rotary" in type(m).__name__.lower() or "rope" in type(m).__name__.lower()
               for m in base.modules())


class GenericTransformers:
    """The registry entry: claims a transformers model or config whose structure `discover` reads."""

    name = "auto"
    covers = "any transformers model with a standard layout (block stack, Q/K/V/O projections)"
    library = "transformers"

    def claims(self, obj) -> bool:
        return self.resolve(obj, quiet=True) is not None

    def resolve(self, obj, quiet: bool = False) -> GenericFamily | None:
        config = getattr(obj, "config", obj)
        if not hasattr(config, "model_type") or not hasattr(config, "to_json_string"):
            return None
        try:
            return _cached(config)
        except Unsupported as e:
            if quiet:
                return None
            raise fail("model", f"model_type {config.model_type!r}", f"is not supported: {e}",
                       "open an issue at reshape's tracker with the printed module tree (print(model)), or "
                       "register an adapter with reshape.families.register") from None

    def reason(self, obj) -> str | None:
        config = getattr(obj, "config", obj)
        try:
            _cached(config)
        except Unsupported as e:
            return str(e)
        return None


COUNT_KEYS = ("num_attention_heads", "num_hidden_layers", "hidden_size")  # standard names (attribute_map aliases)


def _cached(config) -> GenericFamily:
    # The structure depends on the config only; a deep copy keeps the caller's config untouched.
    for name in COUNT_KEYS:  # a broken config is the source's fault: say so before the skeleton crashes on it
        if getattr(config, name, None) is not None and not isinstance(getattr(config, name), list | tuple):
            config_count(config, name)  # (a list is per stage, as in Swin: discover says why that is refused)
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        try:
            _CACHE[key] = discover(copy.deepcopy(config))
        except Unsupported as e:
            _CACHE[key] = e
        except Exception as e:  # the model's own code failed on its meta skeleton: name it, in one line
            _CACHE[key] = Unsupported(f"its structure could not be read ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:120]})")
    result = _CACHE[key]
    if isinstance(result, Unsupported):
        raise result
    return result


_CACHE: dict[str, GenericFamily | Unsupported] = {}

GENERIC = GenericTransformers()
