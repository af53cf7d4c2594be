"""The model card (README.md) of an output folder, built from what the folder records about itself.

The metadata goes through huggingface_hub's ModelCardData, so the Hub reads the base model, license,
task and eval results from it; the body says what changed, what it saves, how the model was recovered
and how to load it. Every output folder gets its card when it is written, so `reshape push` only uploads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .source import is_timm_config, needs_reshape
from .summary import cell

PAPER = '"Leaner Transformers: More Heads, Less Depth" (Saratchandran, Teney, Lucey; arXiv 2505.20802)'
CITATION = """@misc{saratchandran2025leaner,
  title         = {Leaner Transformers: More Heads, Less Depth},
  author        = {Saratchandran, Hemanth and Teney, Damien and Lucey, Simon},
  year          = {2025},
  eprint        = {2505.20802},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2505.20802}
}"""
# reshape's task names -> the Hub's pipeline tags
PIPELINE_TAGS = {"seq-cls": "text-classification", "token-cls": "token-classification", "masked-lm": "fill-mask",
                 "causal-lm": "text-generation", "image-cls": "image-classification"}
# the task a model class already carries a head for (a converted model keeps its source's head)
CLASS_TASKS = (("ForSequenceClassification", "seq-cls"), ("ForTokenClassification", "token-cls"),
               ("ForMaskedLM", "masked-lm"), ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
               ("ForImageClassification", "image-cls"), ("VisionTransformer", "image-cls"))
# Auto classes the card names without importing transformers to check (tests/test_card.py: they exist)
COMMON_AUTO_CLASSES = frozenset(f"AutoModelFor{head}" for head in (
    "CausalLM", "MaskedLM", "SequenceClassification", "TokenClassification", "QuestionAnswering",
    "ImageClassification", "MultipleChoice", "PreTraining", "Seq2SeqLM"))
METRICS = {"accuracy": "accuracy", "f1": "macro F1", "perplexity": "perplexity", "cosine": "embedding cosine"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
log = logging.getLogger("reshape")


def write_card(folder: str | Path, source: str | Path | None = None, name: str | None = None) -> str:
    """Write folder/README.md; `source` is the model the folder was made from (folder, alias or Hub id),
    read for the conversion recipe, base model and license when the folder itself does not record them;
    `name` is the model's name when the folder is a staging folder with a temporary name."""
    text = str(build_card(folder, source, name))
    (Path(folder) / "README.md").write_text(text)
    return text


def write_recipe_and_card(folder: Path, recipe: dict, source: str | Path | None, name: str) -> None:
    """A converted folder's reshape.json, then its card, which reads it."""
    (folder / "reshape.json").write_text(json.dumps(recipe, indent=2) + "\n")
    write_card(folder, source, name=name)


def build_card(folder: str | Path, source: str | Path | None = None, name: str | None = None) -> ModelCard:
    folder = Path(folder)
    name = name or folder.name
    finetuned = _json(folder / "finetune.json")
    source = source or (finetuned or {}).get("model")  # finetune.json names the model it started from
    source_folder, source_hub_id = _resolve(source)
    recipe = _json(folder / "reshape.json") or (_json(source_folder / "reshape.json") if source_folder else None)
    distilled = (recipe or {}).get("distillation")
    if recipe and "plan" not in recipe:  # distilled with --layer-map from a model reshape did not convert
        recipe = None
    config = _json(folder / "config.json") or {}
    timm = is_timm_config(config)
    source_meta = _metadata(source_folder) or _metadata(folder)  # a card being rebuilt keeps what it inherited

    trained = finetuned or (distilled if distilled and distilled.get("task") else None)
    task = (trained or {}).get("task") or _class_task(config, recipe)
    pipeline_tag = PIPELINE_TAGS.get(task) or source_meta.get("pipeline_tag")  # a converted model keeps its role
    recipe_hub_id = _hub_id((recipe or {}).get("hub_id"))
    base_model = recipe_hub_id or _hub_id(source_hub_id) or _hub_id(source_meta.get("base_model"))
    datasets = [d for d in ((distilled or {}).get("data"), (finetuned or {}).get("data")) if _hub_dataset(d)]
    results = _eval_results(trained, pipeline_tag)
    data = ModelCardData(
        base_model=base_model,
        library_name="timm" if timm else "transformers",
        license=source_meta.get("license"),
        license_name=source_meta.get("license_name"),
        license_link=source_meta.get("license_link"),
        tags=["reshape", "more-heads-less-depth"] + ([pipeline_tag] if pipeline_tag else []),
        pipeline_tag=pipeline_tag,
        datasets=list(dict.fromkeys(datasets)) or None,
        model_name=name if results else None,  # only model-index uses it
        eval_results=results or None,
    )
    body = [f"# {name}", "", _summary(recipe, recipe_hub_id, distilled, finetuned, source), ""]
    if recipe:
        body += _changes(recipe)
    report = next((p for p in (folder / "report.md", folder / "report" / "report.md") if p.is_file()), None)
    if report:
        body += ["## Savings report", "", report.read_text().strip(), ""]
    body += _recovery(distilled, finetuned)
    body += _loading(name, config, timm, needs_reshape(folder))
    body += ["## Citation", "", f"The recipe is that of {PAPER}:", "", "```bibtex", CITATION, "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def auto_class(architecture: str | None) -> str:
    """The transformers Auto class that loads `architecture`, e.g. BertForMaskedLM -> AutoModelForMaskedLM."""
    architecture = architecture or ""
    if "For" in architecture:
        name = "AutoModel" + architecture[architecture.index("For"):]
        if name in COMMON_AUTO_CLASSES:
            return name
        import transformers  # (seconds to import: only for the rarer heads)

        if hasattr(transformers, name):
            return name
    return "AutoModelForCausalLM" if architecture.endswith("LMHeadModel") else "AutoModel"


def _resolve(source) -> tuple[Path | None, str | None]:
    """(local folder, Hub id) of a source given as a folder, a preset alias or a Hub id."""
    if source is None:
        return None, None
    path = Path(source)
    if (path / "config.json").is_file():
        return path, None
    from .presets import load_presets

    preset = load_presets().get(str(source))
    if preset:
        return preset.local_folder(), preset.hub_id
    return None, str(source) if HUB_ID.match(str(source)) else None


def _hub_id(value) -> str | list[str] | None:
    """`value` if huggingface_hub accepts it as a repo id (for a list, its ids that it accepts), else None.

    Omitted rather than refused: the card is written after the work, the value comes from files the
    source carries (its reshape.json or card), and base_model is optional metadata, so a crafted one
    such as `../../etc` must not reach the card but is no reason to throw away a finished run."""
    if value is None:
        return None
    if isinstance(value, list):  # a card may name several base models (a merge)
        return [v for v in value if _hub_id(v)] or None
    if _is_repo_id(value):
        return value
    log.warning("reshape: %r is not a Hub repo id; the model card leaves it out of base_model", value)
    return None


def _is_repo_id(value) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
        return True
    except HFValidationError:
        return False


def _shown(name) -> str:
    """A source or data name as the card shows it: local paths by their last part, not the user's tree."""
    name = str(name)
    return Path(name).name if Path(name).exists() or ("/" in name and not HUB_ID.match(name)) else name


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _metadata(folder: Path | None) -> dict:
    """The YAML metadata of a folder's own model card, if it has one."""
    if folder is None or not (folder / "README.md").is_file():
        return {}
    try:
        return ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card the Hub itself could not parse: inherit nothing from it
        return {}


def _class_task(config: dict, recipe: dict | None) -> str | None:
    names = list(config.get("architectures") or []) + [config.get("architecture") or "", (recipe or {}).get("class")]
    return next((task for suffix, task in CLASS_TASKS for name in names if name and suffix in name), None)


def _hub_dataset(data: str | None) -> bool:
    """Whether `data` names a Hub dataset: not one of reshape's recipes, not a local file or folder."""
    if not data or Path(data).exists() or not re.match(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$", data) \
            or not _is_repo_id(data):
        return False
    from .train.data import RECIPES

    return data not in RECIPES


def _eval_results(trained: dict | None, pipeline_tag: str | None) -> list[EvalResult]:
    if not trained or not pipeline_tag:
        return []
    data = trained["data"]
    name = data if _hub_dataset(data) else Path(data).name
    return [EvalResult(task_type=pipeline_tag, dataset_type=name, dataset_name=name, dataset_split=split,
                       metric_type=key, metric_name=f"{split} {label}", metric_value=round(trained[split][key], 4))
            for split in ("validation", "test") if trained.get(split)
            for key, label in METRICS.items() if key in trained[split]]


def _summary(recipe, hub_id, distilled, finetuned, source) -> str:
    if recipe:
        text = (f"`{hub_id or _shown(recipe['source'])}` rebuilt by reshape "
                f"{recipe['reshape_version']} with more attention heads and fewer layers, the recipe of {PAPER}.")
    elif finetuned:
        text = f"`{_shown(source) if source else 'a model'}` fine-tuned by reshape; its architecture was not changed."
    else:
        text = "A model folder written by reshape."
    if recipe and not (distilled or finetuned):
        text += (" It starts from the kept layers of the source and has not been distilled or fine-tuned yet: "
                 "expect lower accuracy than the source until it is (`reshape distill`, `reshape finetune`).")
    return text


def _changes(recipe: dict) -> list[str]:
    old, new, plan, params = recipe["source_shape"], recipe["shape"], recipe["plan"], recipe["params"]
    rows = [("layers", "layers"), ("attention heads", "heads"), ("KV heads", "kv_heads"), ("head dim", "head_dim"),
            ("hidden width", "hidden"), ("MLP width", "mlp")]
    table = ["| | source | this model |", "|---|---:|---:|"]
    table += [f"| {label} | {cell(old[key])} | {cell(new[key])} |" for label, key in rows]  # lists: per stage
    table += [f"| parameters | {params['source']['total']:,} | {params['result']['total']:,} |",
              f"| parameters without embeddings | {params['source']['non_embedding']:,} | "
              f"{params['result']['non_embedding']:,} |"]
    split = plan.get("head_split") or "-"
    if "head_split_calib" in recipe:
        split += f", fitted on {recipe['head_split_calib']}"
    saved = params["source"]["total"] - params["result"]["total"]
    notes = [f"- Kept source layers: {', '.join(map(str, plan['keep']))}"
             + (f" (by Block Influence on {recipe['layer_scores']['calib']})" if "layer_scores" in recipe else ""),
             f"- Head mode: {plan['head_mode']}; head split: {split}",
             f"- MLP width: {cell(new['mlp'])}" + (" (neurons with the largest weight norms kept)" if plan.get("mlp")
                                              else " (unchanged)"),
             f"- Initialisation: {plan['init']}",
             f"- Parameters saved: {saved:,} ({params['saved_fraction']:.1%} of the source's)"]
    return ["## What changed", "", *table, "", *notes, "",
            "The full recipe is in `reshape.json`.", ""]


def _recovery(distilled: dict | None, finetuned: dict | None) -> list[str]:
    if not (distilled or finetuned):
        return []
    lines = ["## How it was recovered", ""]
    if distilled:
        weights = ", ".join(f"{k} {v:g}" for k, v in distilled["weights"].items() if v)
        lines += ["### Distillation", "",
                  f"- Teacher: `{_shown(distilled['teacher'])}`; data: `{_shown(distilled['data'])}`"
                  + (f"; task: {distilled['task']}" if distilled.get("task") else " (unlabelled text)"),
                  f"- Student layers learn teacher layers {', '.join(map(str, distilled['layer_map']))} in order; "
                  f"loss weights: {weights}; temperature {distilled['temperature']:g}",
                  *_training(distilled), ""]
    if finetuned:
        lines += ["### Fine-tuning", "",
                  f"- Task: {finetuned['task']}; data: `{_shown(finetuned['data'])}` ({finetuned['train_examples']:,} "
                  f"training, {finetuned['validation_examples']:,} validation, {finetuned['test_examples']:,} test "
                  "examples)"
                  + (f"; LoRA rank {finetuned['lora']}, merged" if finetuned.get("lora") else ""),
                  *_training(finetuned), ""]
    return lines


def _training(run: dict) -> list[str]:
    lines = []
    config = run.get("config")
    if config:
        lines.append(f"- {run['steps']:,} optimizer steps, batch {config['batch_size']} x {config['grad_accum']} "
                     f"accumulation, peak learning rate {config['lr']:g}, seed {config['seed']}")
    else:
        lines.append(f"- {run['steps']:,} optimizer steps")
    for split, words in (("validation", "Validation (picks the checkpoint)"), ("test", "Test (scored once)")):
        result = run.get(split) or {}
        scores = [f"{METRICS[k]} {result[k]:.4f}" for k in METRICS if k in result]
        if "distill_loss" in result and not scores:
            scores.append(f"distillation loss {result['distill_loss']:.4f}")
        if scores:
            lines.append(f"- {words}, step {result.get('step', run['steps'])}: {', '.join(scores)}")
    return lines


def _loading(name: str, config: dict, timm: bool, reason: str | None) -> list[str]:
    if reason:  # the folder's family says only reshape builds it (Family.needs_reshape)
        code = ["import reshape", "", f'model = reshape.load("{name}")  # this folder']
        return ["## Loading (needs reshape)", "", f"Plain {'timm' if timm else 'transformers'} cannot build it "
                f"({reason}), so it loads through reshape:", "", "```python", *code, "```", ""]
    if timm:
        code = ["import timm", "", f'model = timm.create_model("local-dir:{name}", pretrained=True)  # this folder',
                '# from the Hub: timm.create_model("hf-hub:OWNER/NAME", pretrained=True)']
    else:
        cls = auto_class((config.get("architectures") or [None])[0])
        code = [f"from transformers import {cls}", "",
                f'model = {cls}.from_pretrained("{name}")  # this folder, or its Hub repo id']
    return ["## Loading (reshape not needed)", "", "```python", *code, "```", ""]
