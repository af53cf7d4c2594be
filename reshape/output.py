"""Writing an output folder: all or nothing, and never over the user's files without --overwrite."""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import Problem

# Source files that the new folder must not inherit: the family writes its own config and weights,
# and the card and recipe describe the new model.
NOT_COPIED = ("config.json", "README.md", "reshape.json", ".gitattributes", "*.safetensors", "*.bin", "*.pt",
              "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "*.index.json", ".cache")


def output_problems(out: Path, overwrite: bool, source_folder: Path | None = None) -> list[Problem]:
    """What is wrong with writing to OUT: anything that would damage the user's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return [Problem("out", out, "is a file", "choose a folder path")]
    problems = []
    if source_folder is not None:
        source, target = Path(source_folder).resolve(), out.resolve()
        if target == source or source in target.parents:
            problems.append(Problem("out", out, "is inside the source model's folder", "choose a folder outside it"))
        elif target in source.parents:
            problems.append(Problem("out", out, "contains the source model", "choose a folder that does not"))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        problems.append(Problem("out", out, "is not empty", "pass --overwrite to replace it, or choose another folder"))
    return problems


@contextmanager
def staged(out: Path):
    """Yield a temporary sibling folder; move it into place only when the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.reshape-tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.reshape-old-{tag}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def copy_extra_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer/processor and pooling files from the source folder; keep what dest already has."""
    copied = []
    ignore = shutil.ignore_patterns(*NOT_COPIED)
    skipped = ignore(str(source), [p.name for p in source.iterdir()])
    for item in sorted(source.iterdir()):
        target = dest / item.name
        if item.name in skipped or target.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target, ignore=ignore)
        else:
            shutil.copy2(item, target)
        copied.append(item.name)
    return copied

