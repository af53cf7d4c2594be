"""`inspect` from config.json alone: shapes and parameter counts without torch or transformers.

`reshape inspect` of a preset or a local folder reads the config's numbers and counts the parameters of
the class it names with the formulas below, when the model is one of the declared transformers families
(BERT, RoBERTa, ViT, GPT-2, LLaMA-style: llama, qwen2, mistral) and its class is one counted here. Every
other source (a timm model, the generic adapter's model types, an encoder-decoder, a GGUF file, a Hub id,
remote code, a class or config key not modelled here, a plan the config classes might refuse, any error)
goes to the meta-model path (`reshape.pipeline.inspect_meta`), which builds the model on the meta device and
counts its parameters; tests/test_inspect.py holds the two to the same report, number for number.

Importing torch alone takes longer than answering here (docs/results/startup.md), and transformers' config
classes import torch, so the class defaults the formulas need are written out here (checked against the
classes by tests/test_inspect.py). For the LLaMA-style types the tensors themselves are described too
(`Kind.tensors`): reshape/config_convert.py converts such folders from config.json alone.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import validate
from .errors import ReshapeError
from .plan import Shape, target_shape
from .presets import load_presets
from .stages import any_plan
from .summary import describe

# The plan options `inspect` takes (reshape.pipeline.PLAN_OPTIONS, which this module cannot import: it
# imports torch). tests/test_inspect.py checks the two agree.
PLAN_OPTIONS = ("keep", "select", "keep_head_dim", "mlp", "init", "allow_fewer_heads", "force", "head_split",
                "inner_heads")


def inspect(source, heads: int | None = None, depth: int | None = None, *, trust_remote_code: bool = False,
            **options) -> dict:
    """Shapes and parameter counts of a model and, when heads/depth/options are given, of the result.
    Reads configs only: no weights are loaded for a name or folder, and for the declared transformers
    families nothing is built (the counts follow from the config); `source` may also be a model object."""
    if isinstance(source, (str, os.PathLike)):
        report = config_report(str(source), heads, depth, **options)  # (remote code: never answered there)
        if report is not None:
            return report
    from .pipeline import inspect_meta  # torch and transformers' modeling code: only when needed

    return inspect_meta(source, heads, depth, trust_remote_code=trust_remote_code, **options)


def config_report(source: str, heads=None, depth=None, **options) -> dict | None:
    """`inspect`'s report computed from the source's config alone, or None where this module cannot be
    sure of the meta-model path's answer (then that path answers, errors included)."""
    config = _source_config(source)
    if config is None:
        return None
    kind = KINDS.get(config.get("model_type"))
    if kind is None:
        return None
    resolved = kind.resolve(config)
    if resolved is None:
        return None
    shape = kind.shape(resolved)
    source_counts = kind.count(resolved)
    if shape is None or source_counts is None:
        return None
    report = {"family": kind.family, "source": describe(shape, source_counts)}
    asked = [heads, depth, options.get("keep"), options.get("mlp"), options.get("keep_head_dim") or None,
             options.get("inner_heads")]
    if all(x is None for x in asked):
        return report
    planned = plan_from_config(kind, shape, heads, depth, options)
    if planned is None:
        return None
    plan, by_importance = planned
    new = kind.new_config(resolved, shape, plan)
    new_counts = kind.count(new)
    if new_counts is None:
        return None
    report["plan"] = plan.to_dict()
    if by_importance:  # convert picks them from the scores; the counts do not depend on which
        report["plan"]["keep"] = "by importance"
    report["result"] = describe(target_shape(shape, plan), new_counts)
    return report


def _source_config(source: str) -> dict | None:
    """The config dict `inspect` would read for `source`, in the order reshape.source.open_source looks;
    None for anything but a preset's recorded architecture or a local folder's config.json."""
    presets = load_presets()
    preset = presets.get(source)
    folder = Path(source)
    if (folder / "config.json").is_file():
        pass
    elif preset is None:
        return None  # a Hub id, a timm name, a GGUF file or a mistake: the meta-model path says which
    elif (local := preset.local_folder()) is None:
        return dict(preset.config)  # the preset records its architecture: no download, as in inspect_meta
    elif preset.gguf_file or (folder.is_file() and folder.suffix == ".gguf"):
        return None
    else:
        folder = local
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:  # remote code: refused, or its own classes
        return None
    return config


def plan_from_config(kind: Kind, shape: Shape, heads, depth, options: dict):
    """(plan, whether convert picks the layers by importance) as reshape.pipeline.plan_for makes it for
    this family, or None: no heads, depth or keep (the preset or rule of thumb fills them in, with a
    warning), or any problem (the meta-model path raises it)."""
    if set(options) - set(PLAN_OPTIONS) or (heads is None and depth is None and options.get("keep") is None):
        return None
    options = dict(options)
    try:
        validate.whole_numbers(heads=heads, depth=depth, keep=options.get("keep"), mlp=options.get("mlp"),
                               inner_heads=options.get("inner_heads"))
        select = options.get("select") or ("importance" if kind.decoder_only else "uniform")
        options["select"] = "uniform" if select == "importance" else select
        plan = any_plan(shape, family=kind.family, heads=heads, depth=depth,
                        can_widen_attention=kind.can_widen_attention, can_split_aware=kind.can_split_aware,
                        **options)
    except ReshapeError:
        return None
    # The config class validates the rewritten config (reshape.families.hf.HFFamily.config_problem):
    # LlamaConfig insists that the heads divide hidden_size (the others here check nothing the plan can
    # change); the meta-model path says so, with the head counts it would take.
    if kind.heads_divide_hidden and shape.hidden % plan.heads:
        return None
    return plan, options.get("keep") is None and select == "importance"


def _linear(inputs: int, outputs: int, bias: bool = True) -> int:
    return inputs * outputs + (outputs if bias else 0)


def _count(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class Counts:
    """A class's parameters in three parts: embeddings (what count_params calls embeddings), one block of
    the stack, and the rest (final norm, pooler, task head; a tied output layer counted once)."""

    embeddings: int
    block: int
    rest: int


@dataclass(frozen=True)
class Kind:
    """What this module knows of one model type: its family's config keys, the structural config values
    with the config class's defaults, and per class the parameter counts."""

    family: str
    keys: dict[str, str]  # heads, layers, hidden, mlp, and for the LLaMA family kv_heads and head_dim
    defaults: dict  # every config value the counts read, as the config class defaults it
    counts: Callable[[dict, str], Counts | None]  # (resolved config, class name) -> counts, None: not counted
    base_class: str  # what transformers builds when `architectures` names no class
    decoder_only: bool  # reshape.families.hf.HFFamily.decoder_only for this type
    can_widen_attention: bool = False
    can_split_aware: bool = True
    heads_divide_hidden: bool = False  # the config class refuses a head count that does not divide the width
    aliases: tuple[str, ...] = ()  # attribute_map names: a config spelling them goes to the meta-model path
    optional: tuple[str, ...] = ()  # values that may be None (the class derives them)
    flags: tuple[str, ...] = ()  # boolean values
    pairs: tuple[str, ...] = ()  # values that may be a number or a (height, width) pair
    # The config class's derived values, set in the resolved config; False where the config is one the
    # formulas do not describe.
    post_init: Callable[[dict, dict], bool] | None = None
    # (resolved config, class name) -> the tensors save_pretrained writes, name -> shape; None where not
    # described here (reshape/config_convert.py converts only what it describes)
    tensors: Callable[[dict, str], dict[str, tuple[int, ...]] | None] = lambda c, cls: None

    def resolve(self, raw: dict) -> dict | None:
        """The config's values as the config class holds them (defaults filled in, derived values derived),
        plus the class to build and num_labels; None where a value is not what the formulas assume."""
        if any(key in raw for key in self.aliases) or raw.get("is_encoder_decoder") or raw.get("add_cross_attention"):
            return None
        c = {key: raw.get(key, default) for key, default in self.defaults.items()}
        for key, value in c.items():
            if key in self.flags:
                if not isinstance(value, bool):
                    return None
            elif not (value is None and key in self.optional) and not _count(value) \
                    and not (key in self.pairs and _count_pair(value)):
                return None
        if self.post_init and not self.post_init(c, raw):
            return None
        archs = raw.get("architectures") or []
        c["class"] = archs[0] if isinstance(archs, list) and archs else self.base_class
        if not isinstance(c["class"], str):
            return None
        labels = raw.get("id2label")
        if labels is not None:
            if not isinstance(labels, dict):
                return None
            c["num_labels"] = len(labels)
        else:
            c["num_labels"] = raw.get("num_labels", 2)
            if not _count(c["num_labels"]):
                return None
        if raw.get("problem_type") == "single_label_classification" and c["num_labels"] == 1:
            return None  # the config class refuses it
        return c

    def shape(self, c: dict) -> Shape | None:
        """reshape.families.hf.HFFamily.shape of this config; None where it would refuse it."""
        k = self.keys
        heads, hidden, layers = c[k["heads"]], c[k["hidden"]], c[k["layers"]]
        if not all(_count(v) for v in (heads, hidden, layers)):
            return None
        kv = c.get(k.get("kv_heads")) or heads
        head_dim = c.get(k.get("head_dim"))
        if (head_dim is None or self.heads_divide_hidden) and hidden % heads:  # (LlamaConfig refuses it)
            return None
        if not (_count(kv) and (head_dim is None or _count(head_dim))):
            return None
        return Shape(layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim or hidden // heads, hidden=hidden,
                     mlp=c[k["mlp"]] or 4 * hidden)

    def new_config(self, c: dict, shape: Shape, plan) -> dict:
        """The resolved config of the result: reshape.families.hf.HFFamily.new_config's changes."""
        new_shape = target_shape(shape, plan)
        k = self.keys
        new = {**c, k["heads"]: new_shape.heads, k["layers"]: new_shape.layers}
        if "kv_heads" in k:
            new[k["kv_heads"]] = new_shape.kv_heads
        if "head_dim" in k:
            new[k["head_dim"]] = new_shape.head_dim
        if plan.mlp:
            new[k["mlp"]] = new_shape.mlp
        return new

    def count(self, c: dict) -> dict[str, int] | None:
        """count_params of the class the config names, built from it; None for a class not counted here."""
        counts = self.counts(c, c["class"])
        if counts is None:
            return None
        total = counts.embeddings + c[self.keys["layers"]] * counts.block + counts.rest
        return {"total": total, "embeddings": counts.embeddings, "non_embedding": total - counts.embeddings}


def _count_pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_count(v) for v in value)


def _pair(value) -> tuple[int, int]:
    return (value[0], value[1]) if isinstance(value, (list, tuple)) else (value, value)


def _bert_counts(c: dict, cls: str, prefix: str) -> Counts | None:
    """BERT and RoBERTa (the same blocks; RoBERTa names its task heads differently)."""
    h, m, vocab, labels = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_labels"]
    embeddings = (vocab + c["max_position_embeddings"] + c["type_vocab_size"]) * h + 2 * h
    block = 4 * _linear(h, h) + _linear(h, m) + _linear(m, h) + 4 * h  # q, k, v, o; the MLP; two layer norms
    pooler = _linear(h, h)
    # transform, layer norm, output bias; an untied decoder has its own weight and bias
    lm = _linear(h, h) + 2 * h + vocab + (0 if c["tie_word_embeddings"] else _linear(h, vocab))
    if prefix == "Bert":
        heads = {"Model": pooler, "ForMaskedLM": lm, "LMHeadModel": lm, "ForPreTraining": pooler + lm + _linear(h, 2),
                 "ForNextSentencePrediction": pooler + _linear(h, 2),
                 "ForSequenceClassification": pooler + _linear(h, labels), "ForMultipleChoice": pooler + _linear(h, 1),
                 "ForTokenClassification": _linear(h, labels), "ForQuestionAnswering": _linear(h, labels)}
    else:
        heads = {"Model": pooler, "ForMaskedLM": lm, "ForCausalLM": lm,
                 "ForSequenceClassification": _linear(h, h) + _linear(h, labels),
                 "ForMultipleChoice": pooler + _linear(h, 1), "ForTokenClassification": _linear(h, labels),
                 "ForQuestionAnswering": _linear(h, labels)}
    rest = heads.get(cls.removeprefix(prefix)) if cls.startswith(prefix) else None
    return None if rest is None else Counts(embeddings, block, rest)


def _vit_counts(c: dict, cls: str) -> Counts | None:
    h, m, labels = c["hidden_size"], c["intermediate_size"], c["num_labels"]
    (ih, iw), (ph, pw) = _pair(c["image_size"]), _pair(c["patch_size"])
    patches = (ih // ph) * (iw // pw)
    embeddings = h + (patches + 1) * h + _linear(c["num_channels"] * ph * pw, h)  # class token, positions, patches
    block = 3 * _linear(h, h, c["qkv_bias"]) + _linear(h, h) + _linear(h, m) + _linear(m, h) + 4 * h
    heads = {"ViTModel": _linear(h, c["pooler_output_size"]), "ViTForImageClassification": _linear(h, labels)}
    rest = heads.get(cls)
    return None if rest is None else Counts(embeddings, block, 2 * h + rest)  # the final layer norm


def _gpt2_counts(c: dict, cls: str) -> Counts | None:
    h, vocab, labels = c["n_embd"], c["vocab_size"], c["num_labels"]
    m = c["n_inner"] or 4 * h
    embeddings = (vocab + c["n_positions"]) * h
    block = _linear(h, 3 * h) + _linear(h, h) + _linear(h, m) + _linear(m, h) + 4 * h
    heads = {"GPT2Model": 0, "GPT2LMHeadModel": 0 if c["tie_word_embeddings"] else vocab * h,
             "GPT2ForSequenceClassification": _linear(h, labels, bias=False),
             "GPT2ForTokenClassification": _linear(h, labels), "GPT2ForQuestionAnswering": _linear(h, 2)}
    rest = heads.get(cls)
    return None if rest is None else Counts(embeddings, block, 2 * h + rest)  # ln_f


def _llama_biases(c: dict, attention_bias: bool | None, mlp_bias: bool | None) -> tuple[bool, bool, bool]:
    """(Q/K/V bias, O bias, MLP bias). Qwen2 has Q/K/V biases and Mistral none, whatever the config says;
    LLaMA reads attention_bias (Q/K/V/O) and mlp_bias from its config."""
    if attention_bias is None:
        qkv_bias = o_bias = c["attention_bias"]
    else:
        qkv_bias, o_bias = attention_bias, False
    return qkv_bias, o_bias, c["mlp_bias"] if mlp_bias is None else mlp_bias


def _llama_block(c: dict, attention_bias: bool | None, mlp_bias: bool | None) -> dict[str, tuple[int, ...]]:
    """One decoder block's tensors (names inside the block) and their shapes."""
    h, m = c["hidden_size"], c["intermediate_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c["head_dim"] or h // heads
    qkv_bias, o_bias, mlp_bias = _llama_biases(c, attention_bias, mlp_bias)
    tensors: dict[str, tuple[int, ...]] = {}

    def linear(name: str, inputs: int, outputs: int, bias: bool) -> None:
        tensors[f"{name}.weight"] = (outputs, inputs)
        if bias:
            tensors[f"{name}.bias"] = (outputs,)

    linear("self_attn.q_proj", h, heads * head_dim, qkv_bias)
    linear("self_attn.k_proj", h, kv * head_dim, qkv_bias)
    linear("self_attn.v_proj", h, kv * head_dim, qkv_bias)
    linear("self_attn.o_proj", heads * head_dim, h, o_bias)
    linear("mlp.gate_proj", h, m, mlp_bias)
    linear("mlp.up_proj", h, m, mlp_bias)
    linear("mlp.down_proj", m, h, mlp_bias)
    tensors["input_layernorm.weight"] = tensors["post_attention_layernorm.weight"] = (h,)  # the two RMS norms
    return tensors


def _llama_counts(c: dict, cls: str, prefix: str, attention_bias: bool | None, mlp_bias: bool | None) -> Counts | None:
    """LLaMA-style decoders (Qwen2, Mistral: `_llama_biases`)."""
    h, vocab, labels = c["hidden_size"], c["vocab_size"], c["num_labels"]
    block = sum(math.prod(shape) for shape in _llama_block(c, attention_bias, mlp_bias).values())
    tasks = {"Model": 0, "ForCausalLM": 0 if c["tie_word_embeddings"] else vocab * h,
             "ForSequenceClassification": _linear(h, labels, bias=False), "ForTokenClassification": _linear(h, labels),
             "ForQuestionAnswering": _linear(h, 2)}
    rest = tasks.get(cls.removeprefix(prefix)) if cls.startswith(prefix) else None
    return None if rest is None else Counts(vocab * h, block, h + rest)  # the final norm


def _llama_tensors(c: dict, cls: str, prefix: str, attention_bias: bool | None,
                   mlp_bias: bool | None) -> dict[str, tuple[int, ...]] | None:
    """The tensors save_pretrained writes for the base model and the causal LM (tied output layer left
    out), name -> shape; None for the other classes."""
    if cls == f"{prefix}Model":
        base = ""
    elif cls == f"{prefix}ForCausalLM":
        base = "model."
    else:
        return None
    h, vocab = c["hidden_size"], c["vocab_size"]
    tensors = {f"{base}embed_tokens.weight": (vocab, h)}
    block = _llama_block(c, attention_bias, mlp_bias)
    for i in range(c["num_hidden_layers"]):
        tensors.update({f"{base}layers.{i}.{name}": shape for name, shape in block.items()})
    tensors[f"{base}norm.weight"] = (h,)
    if base and not c["tie_word_embeddings"]:
        tensors["lm_head.weight"] = (vocab, h)
    return tensors


def _llama_post_init(c: dict, raw: dict) -> bool:
    if c["head_dim"] is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    return True


def _mistral_post_init(c: dict, raw: dict) -> bool:
    return _llama_post_init(c, raw)  # the same two rules


def _qwen2_post_init(c: dict, raw: dict) -> bool:
    if c["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]
    # Qwen2Config has no head_dim: its modeling code reads one when the config carries it, and an explicit
    # null there would break it.
    return not ("head_dim" in raw and raw["head_dim"] is None)


def _vit_post_init(c: dict, raw: dict) -> bool:
    c["pooler_output_size"] = c["pooler_output_size"] or c["hidden_size"]
    return True


_BERT_KEYS = {"heads": "num_attention_heads", "layers": "num_hidden_layers", "hidden": "hidden_size",
              "mlp": "intermediate_size"}
_LLAMA_KEYS = {**_BERT_KEYS, "kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
_BERT_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
                  "tie_word_embeddings": True}
_LLAMA_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")

KINDS: dict[str, Kind] = {
    "bert": Kind("bert", _BERT_KEYS, _BERT_DEFAULTS, lambda c, cls: _bert_counts(c, cls, "Bert"), "BertModel", False,
                 flags=("tie_word_embeddings",)),
    "roberta": Kind("roberta", _BERT_KEYS, {**_BERT_DEFAULTS, "vocab_size": 50265},
                    lambda c, cls: _bert_counts(c, cls, "Roberta"), "RobertaModel", False,
                    flags=("tie_word_embeddings",)),
    "vit": Kind("vit", _BERT_KEYS, {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                    "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3,
                                    "qkv_bias": True, "pooler_output_size": None},
                _vit_counts, "ViTModel", False, optional=("pooler_output_size",), flags=("qkv_bias",),
                pairs=("image_size", "patch_size"), post_init=_vit_post_init),
    "gpt2": Kind("gpt2", {"heads": "n_head", "layers": "n_layer", "hidden": "n_embd", "mlp": "n_inner"},
                 {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                  "tie_word_embeddings": True},
                 _gpt2_counts, "GPT2Model", True, optional=("n_inner",), flags=("tie_word_embeddings",),
                 aliases=("hidden_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers")),
    "llama": Kind("llama", _LLAMA_KEYS,
                  {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
                   "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
                  lambda c, cls: _llama_counts(c, cls, "Llama", None, None), "LlamaModel", True,
                  can_widen_attention=True, can_split_aware=False, heads_divide_hidden=True,
                  optional=("num_key_value_heads", "head_dim"), flags=_LLAMA_FLAGS, post_init=_llama_post_init,
                  tensors=lambda c, cls: _llama_tensors(c, cls, "Llama", None, None)),
    "qwen2": Kind("llama", _LLAMA_KEYS,
                  {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None,
                   "tie_word_embeddings": False},
                  lambda c, cls: _llama_counts(c, cls, "Qwen2", True, False), "Qwen2Model", True,
                  can_widen_attention=True, can_split_aware=False, optional=("num_key_value_heads", "head_dim"),
                  flags=("tie_word_embeddings",), post_init=_qwen2_post_init,
                  tensors=lambda c, cls: _llama_tensors(c, cls, "Qwen2", True, False)),
    "mistral": Kind("llama", _LLAMA_KEYS,
                    {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
                     "tie_word_embeddings": False},
                    lambda c, cls: _llama_counts(c, cls, "Mistral", False, False), "MistralModel", True,
                    can_widen_attention=True, can_split_aware=False, optional=("num_key_value_heads", "head_dim"),
                    flags=("tie_word_embeddings",), post_init=_mistral_post_init,
                    tensors=lambda c, cls: _llama_tensors(c, cls, "Mistral", False, False)),
}
