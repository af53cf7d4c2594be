"""What reshape reads from a model folder: files inside it, and weights as safetensors only.

Every file is named relative to its folder and must stay there: no absolute path, no '..', no link
leading out. The one exception is how huggingface_hub stores a download: a snapshot's files link into
the blobs folder of the same repo. Weights are never unpickled (a pickle can run code when loaded,
and torch's `weights_only` guard is a mitigation, not a format): a folder whose only weights are
.bin/.pt/.pth files is refused with the one-line conversion to safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import fail

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".tar")
INDEX = "model.safetensors.index.json"


def roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of `folder` may resolve to: the folder, and for a huggingface_hub snapshot
    (CACHE/models--OWNER--NAME/snapshots/REV) also that repo's blobs, which its files link to."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder, folder.parent.parent / "blobs"
    return (folder,)


def inside(folder: str | Path, name: object, field: str) -> Path:
    """folder/name, refused when `name` (read from a file the folder carries) would lead out of it."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise fail(field, name, f"is not a file name inside {folder}", "name a file relative to the folder")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise fail(field, name, f"is an absolute path; reshape reads only files inside {folder}",
                   "name the file relative to the folder")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise fail(field, name, f"climbs out of {folder} with '..'; reshape reads only files inside it",
                   "name the file relative to the folder")
    path = folder / name
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in roots(folder)):
        raise fail(field, name, f"is a link to {target}, outside {folder}; reshape reads only files inside it",
                   "copy the file into the folder instead of linking it")
    return path


def safetensors_weights(folder: str | Path, name: object, field: str = "model", sharded: bool = True) -> list[Path]:
    """The safetensors files a load of `folder` reads (model.safetensors, or with `sharded` the shards of
    model.safetensors.index.json, as transformers picks them), each inside the folder and readable.
    Refuses a folder whose weights are pickles only, and a PEFT adapter folder (it loads its base
    model from wherever adapter_config.json says)."""
    folder = Path(folder)
    inside(folder, "config.json", f"{field} config.json")
    if (folder / "adapter_config.json").exists():
        raise fail(field, name, "is a PEFT adapter folder, which loads its base model from wherever "
                   "adapter_config.json points", "merge the adapter (merge_and_unload) and save_pretrained the result")
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors").is_symlink():
        files = [inside(folder, "model.safetensors", field)]
    elif sharded and (folder / INDEX).exists():
        try:
            weight_map = json.loads(inside(folder, INDEX, field).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise fail(field, name, f"has an unreadable {INDEX} ({type(e).__name__})",
                       "re-download or re-save the model") from None
        files = [inside(folder, shard, f"{field} {INDEX} weight_map") for shard in shards]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES and p.is_file()) \
            if folder.is_dir() else []
        if pickles:
            raise fail(field, name, f"holds its weights only as a pickle ({', '.join(pickles)}), which reshape "
                       "never loads (unpickling can run code)", convert_fix(folder, pickles))
        looked = "model.safetensors" + (f" or {INDEX}" if sharded else "")
        raise fail(field, name, f"has no weight file in {folder} (looked for {looked})",
                   "re-download the model, or save it with save_pretrained (timm: save_for_hf)")
    for path in files:
        readable(path, field, name)
    return files


def convert_fix(folder: Path, pickles: list[str]) -> str:
    """How to turn a folder's pickle into model.safetensors, once, in a process that trusts the file."""
    if len(pickles) > 1:  # sharded: the library's own loader reassembles the shards
        return ("if you trust the file, load the model with its library and save it again as safetensors "
                "(transformers: save_pretrained; timm: save_for_hf(..., safe_serialization=True))")
    src, dst = folder / pickles[0], folder / "model.safetensors"
    return ("if you trust the file, convert it once: python -c \"import torch; from safetensors.torch import "
            f"save_file; sd = torch.load('{src}', weights_only=True); save_file({{k: v.contiguous().clone() "
            f"for k, v in sd.items()}}, '{dst}', metadata={{'format': 'pt'}})\"")


def readable(path: Path, field: str, name: object) -> None:
    """Refuse a safetensors file whose header or size is wrong, before any loader raises on it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as e:  # SafetensorError, OSError, ...: the file cannot be used as it is
        reason = (str(e).strip().splitlines() or ["no message"])[0][:160]
        raise fail(field, name, f"weights could not be read ({path.name} is not a valid safetensors file: "
                   f"{type(e).__name__}: {reason})", "re-download or re-save the model") from None
