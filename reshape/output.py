"""Writing an output folder: all or nothing, one writer at a time, never over the user's files without
--overwrite.

A writer holds OUT's lock (`locked`, or `locks_out` for a whole command) from its first check to its last
write. Beside OUT, while it runs, are `.OUT.reshape-lock` (the lock), `.OUT.reshape-holder`
(who holds it), `.OUT.reshape-tmp` (the folder being written, renamed to OUT at the end) and, for a moment
under --overwrite, `.OUT.reshape-old`. All go when the run ends; what a killed run leaves, the next run on
OUT removes.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import Problem, ReshapeError, fail

log = logging.getLogger("reshape")

# Source files that the new folder must not inherit: the family writes its own config and weights,
# and the card and recipe describe the new model.
NOT_COPIED = ("config.json", "README.md", "reshape.json", ".gitattributes", "*.safetensors", "*.bin", "*.pt",
              "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "*.index.json", ".cache")

_held: set[Path] = set()  # the OUT folders whose lock this process holds


def _beside(out: Path, kind: str) -> Path:
    """A hidden sibling of OUT named after it: each OUT has its own, and a later run finds it."""
    return out.parent / f".{out.name}.reshape-{kind}"


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def path_problems(out: Path) -> list[Problem]:
    """Whether OUT can be made at all: its parents must be folders, and the nearest one that exists must
    take new entries (a read-only disk or a virtual filesystem such as /proc does not)."""
    existing = _nearest_existing(Path(out).absolute().parent)
    if not existing.is_dir():
        return [Problem("out", out, f"has a parent that is a file ({existing})",
                        "choose a path whose parent folders are folders")]
    try:  # the only sure test of a writable folder is writing to it
        os.rmdir(tempfile.mkdtemp(prefix=".reshape-probe-", dir=existing))
    except OSError as e:
        return [Problem("out", out, f"cannot be written: {existing} refuses new folders ({e.strerror})",
                        "choose a folder on a writable disk")]
    return []


def output_problems(out: Path, overwrite: bool, source_folder: Path | None = None) -> list[Problem]:
    """What is wrong with writing to OUT: anything that would fail, or damage the user's files. Call it
    under OUT's lock (`locked`), so that what it finds still holds when the writing ends."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return [Problem("out", out, "is a file", "choose a folder path")]
    problems = path_problems(out)
    if source_folder is not None:
        source, target = Path(source_folder).resolve(), out.resolve()
        if target == source or source in target.parents:
            problems.append(Problem("out", out, "is inside the source model's folder", "choose a folder outside it"))
        elif target in source.parents:
            problems.append(Problem("out", out, "contains the source model", "choose a folder that does not"))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        problems.append(Problem("out", out, "is not empty", "pass --overwrite to replace it, or choose another folder"))
    return problems


def space_problems(out: Path, size: int) -> list[Problem]:
    """Whether the disk that will hold OUT has `size` bytes free."""
    free = shutil.disk_usage(_nearest_existing(Path(out).absolute().parent)).free
    if free >= size:
        return []
    return [Problem("out", out, f"is on a disk with {free / 1e9:.2f} GB free but the model needs {size / 1e9:.2f} GB",
                    "free some space, or choose a folder on another disk")]


def weight_bytes(model) -> int:
    """The bytes a module's weights take on disk: each tensor once, however often it is tied."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


@contextmanager
def locked(out: Path):
    """Hold OUT's lock for the block: a second writer to OUT is refused at once, with a line naming this one.

    Once the lock is held, what a killed run on OUT left is removed (and said so). The parent folders the
    lock needs are made here, and removed again if the block leaves no OUT."""
    given, out = Path(out), Path(out).absolute()
    if problems := path_problems(given):
        raise ReshapeError(problems)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file, holder = _beside(out, "lock"), _beside(out, "holder")
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        _remove(made)
        by = "it has not said who it is yet"
        with suppress(OSError):
            by = " ".join(holder.read_text().split()) or by  # one line, whatever the file holds
        raise fail("out", given, f"is being written by another reshape process ({by})",
                   "wait for it to finish, or choose another folder") from None
    _held.add(out)
    try:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv and sys.argv[0] else "python"
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}: "
                          f"{command}\n")
        _remove_stale(out)
        yield given
    finally:
        _held.discard(out)
        holder.unlink(missing_ok=True)
        lock_file.unlink(missing_ok=True)  # safe before release: filelock >= 4 refuses a lock on an unlinked file
        lock.release()
        if not out.exists():
            _remove(made)


def locks_out(command):
    """For a command that writes its `out` folder in place as it goes (finetune, distill, sweep): hold
    OUT's lock for the whole call, checks included. Under a distributed launcher only rank 0 takes it:
    the other processes run the same command on the same OUT, and only rank 0 writes."""
    signature = inspect.signature(command)

    @functools.wraps(command)
    def run(*args, **kwargs):
        out = signature.bind(*args, **kwargs).arguments.get("out")
        # A bad `out` is the command's to refuse; a rank other than 0 writes nothing.
        mine = isinstance(out, (str, os.PathLike)) and int(os.environ.get("RANK", "0")) == 0
        with locked(Path(out)) if mine else nullcontext():
            return command(*args, **kwargs)
    return run


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        with suppress(OSError):  # a folder that someone else filled meanwhile stays
            folder.rmdir()


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders a killed run on OUT left: while we hold OUT's lock, nobody else
    writes them. The random 8-hex suffix is how reshape 0.1.0 named them."""
    pattern = re.compile(re.escape(f".{out.name}.reshape-") + r"(tmp|old)(-[0-9a-f]{8})?")
    for stale in sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        log.warning("reshape: removed %s, left by an interrupted run on %s", stale, out)


def _appeared(out: Path) -> ReshapeError:
    return fail("out", out, "was created by another program while reshape was writing, so nothing was replaced",
                "pass --overwrite to replace it, or choose another folder")


@contextmanager
def staged(out: Path, overwrite: bool = False):
    """Yield a temporary sibling folder; move it into place only when the block completes.

    Runs under OUT's lock. An OUT that appeared since the check is replaced only with overwrite."""
    out = Path(out)
    if out.absolute() not in _held:
        raise RuntimeError(f"staged({out}) needs OUT's lock: call it inside locked(out)")
    tmp, old = _beside(out, "tmp"), _beside(out, "old")
    tmp.mkdir()
    try:
        yield tmp
        umask_modes(tmp)
        if not out.exists():
            try:
                tmp.rename(out)
            except OSError as e:  # appeared just now: rename replaces only an empty folder
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise _appeared(out) from None
                raise
        elif not out.is_dir() or (any(out.iterdir()) and not overwrite):
            raise _appeared(out)
        else:
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the mode the process's umask gives new ones: libraries
    that write through a private temporary file (safetensors does) leave 0600, which hides the model
    from the other accounts that should read it."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path):  # chmod would follow it out of the folder
                continue
            full = 0o777 if name in dirs else 0o666 | os.stat(path).st_mode & 0o111  # keep a script runnable
            os.chmod(path, full & ~mask)


def _umask() -> int:
    try:  # Linux shows it; os.umask reads it only by setting it, which races with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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

