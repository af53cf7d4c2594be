"""`reshape push`: upload an output folder to the Hugging Face Hub as one commit.

The folder already carries its model card (written when it was saved), so this module only checks and
uploads. The token comes from HF_TOKEN or the huggingface_hub login and goes nowhere but the
Authorization header that huggingface_hub sends; it is never printed, logged or put in an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .confine import safetensors_weights
from .errors import fail

# Training leftovers that stay local: checkpoints (optimizer state) and the step-by-step log.
LEFTOVERS = ("checkpoints", "metrics.jsonl")
WEIGHTS = ("*.safetensors", "*.bin", "*.pth")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOGIN_FIX = "set HF_TOKEN or run `hf auth login`"


def push(folder: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False) -> dict:
    """Upload `folder` to the model repo `repo` (OWNER/NAME) in a single commit, creating the repo if needed.

    With dry_run, check everything that needs no network and return the files and card that would be
    uploaded; nothing is sent and no token is needed. Returns {"repo", "revision", "private", "files":
    [{"path", "size"}], "card" (README.md's text), "dry_run", "url" and "commit" (None in a dry run)}."""
    folder = Path(folder)
    _check_repo_id(repo)
    files = upload_files(folder)
    check_loads(folder)
    card = folder / "README.md"
    result = {"repo": repo, "revision": revision or "main", "private": private,
              "files": [{"path": path, "size": (folder / path).stat().st_size} for path in files],
              "card": card.read_text() if card.is_file() else None, "dry_run": dry_run, "url": None, "commit": None}
    if dry_run:
        return result
    token = _token()
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads its own at import
    try:
        commit = _upload(folder, files, repo, token, endpoint, private, revision,
                         commit_message or f"Upload {folder.name} (reshape)")
    except Exception as e:
        raise _hub_error(e, repo, revision, endpoint or _default_endpoint(), token) from None
    return {**result, "url": commit.commit_url, "commit": commit.oid}


def upload_files(folder: Path) -> list[str]:
    """The folder's files that a push uploads, relative and sorted; refuses a folder that is no model output."""
    if not folder.is_dir():
        raise fail("folder", folder, "is not a folder",
                   "pass the output folder of reshape convert, distill or finetune")
    if not (folder / "config.json").is_file() or not any(any(folder.glob(w)) for w in WEIGHTS):
        raise fail("folder", folder, "is not a model folder (it needs config.json and weights)",
                   "pass the output folder of reshape convert, distill or finetune")
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        # hidden names are staging folders, caches and editor files; leftovers are for resuming training
        if path.is_file() and parts[0] not in LEFTOVERS and not any(p.startswith(".") for p in parts):
            files.append("/".join(parts))
    return files


def check_loads(folder: Path) -> None:
    """Load the folder as a user would, with plain transformers or timm (no reshape, no remote code)."""
    from .source import is_timm_folder, needs_reshape

    is_timm = is_timm_folder(folder)
    library = "timm" if is_timm else "transformers"
    if reason := needs_reshape(folder):  # the folder's family says why
        raise fail("folder", folder, f"needs reshape to load ({reason}), so Hub users could not load it with "
                   f"{library}", f"convert without the option that made it to push a folder plain {library} loads")
    safetensors_weights(folder, folder, field="folder", sharded=not is_timm)  # no pickles
    try:
        if is_timm:
            import timm

            timm.create_model(f"local-dir:{folder}", pretrained=True)
            return
        import transformers

        from .card import auto_class

        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        loader = getattr(transformers, auto_class((config.architectures or [None])[0]))
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the load report would repeat what the error says
        try:
            _, info = loader.from_pretrained(folder, trust_remote_code=False, output_loading_info=True,
                                             use_safetensors=True,
                                             ignore_mismatched_sizes=True)  # listed below, not raised
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as e:
        raise fail("folder", folder, f"does not load with plain transformers/timm ({type(e).__name__}: "
                   f"{_first_line(e)})", "push a complete output folder of reshape convert, distill or finetune") \
            from None
    missing = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
    if missing:
        raise fail("folder", folder, f"loads with {len(missing)} weights missing or of the wrong shape "
                   f"(e.g. {missing[0]})", "push a complete output folder of reshape convert, distill or finetune")


def check_target(repo: str) -> None:
    """What --push-to-hub needs that can be checked before the work whose result it uploads: the repo id
    and a token. Found missing only after an hour of training, the upload would be lost work."""
    _check_repo_id(repo)
    _token()


def _token() -> str:
    token = os.environ.get("HF_TOKEN") or _login_token()
    if not token:
        raise fail("token", None, "no Hugging Face token found", LOGIN_FIX)
    return token


def _check_repo_id(repo: str) -> None:
    name = repo.split("/")[-1]
    if not REPO_ID.match(repo) or "--" in repo or ".." in repo or len(name) > 96 or name.endswith(".git"):
        raise fail("repo", repo, "is not a Hub repo id of the form OWNER/NAME (letters, digits, '-', '_', '.')",
                   "pass e.g. --repo your-name/minilm-leaner")


def _login_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _upload(folder, files, repo, token, endpoint, private, revision, message):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo, branch=revision, exist_ok=True)
    # One create_commit rather than upload_folder: with hf_xet installed, upload_folder may split a folder
    # into several commits, and a failed push must leave none.
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in files]
    return api.create_commit(repo, operations, commit_message=message, revision=revision)


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_error(error: Exception, repo: str, revision: str | None, endpoint: str, token: str) -> Exception:
    """The one-line error for a failed push, naming the fix; the token never appears in it."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    cause = error
    while cause is not None and not isinstance(cause, (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled)):
        cause = cause.__cause__ or cause.__context__  # huggingface_hub wraps LFS upload errors
    if isinstance(cause, OfflineModeIsEnabled):
        return fail("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"), "offline mode blocks the upload",
                    "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push")
    if isinstance(cause, httpx2.TransportError):
        return fail("endpoint", endpoint, f"cannot be reached ({type(cause).__name__}); nothing was committed",
                    "check the network connection and HF_ENDPOINT, then push again")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        if status == 401:
            return fail("token", "(hidden)", f"was rejected by {endpoint} (HTTP 401); nothing was committed",
                        f"{LOGIN_FIX} with a valid token")
        if status == 403:
            return fail("repo", repo, "cannot be written with this token (HTTP 403); nothing was committed",
                        "use a token with write access to the repo's owner, or push to your own namespace")
        if status == 409:
            return fail("repo", repo, f"conflict on {revision or 'main'} (HTTP 409: another change is in "
                        "progress or the branch moved); nothing was committed", "push again")
        if status == 404:
            return fail("repo", repo, "was not found (HTTP 404); nothing was committed",
                        "check the repo id and that the token's account may create repos under its owner")
        return fail("repo", repo, f"the Hub answered HTTP {status}; nothing was committed", "push again later")
    reason = _first_line(error).replace(token, "(token)")  # huggingface_hub never puts it there; make sure
    return fail("repo", repo, f"upload failed ({type(error).__name__}: {reason}); nothing was committed", "push again")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no message"
