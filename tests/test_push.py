"""`reshape push` and the model card, tested for real through huggingface_hub against a local Hub.

The Hub is unreachable from here, so `LocalHub` (stdlib http.server on 127.0.0.1, a free port) implements
the endpoints huggingface_hub 2.4.0 calls for create_repo, create_branch and create_commit: repo creation,
README metadata validation, preupload (regular vs LFS), the LFS batch API with a basic PUT upload and a
verify call, and the NDJSON commit. It keeps what was committed, so the tests assert on what arrived.
huggingface_hub uploads through xet whenever hf_xet is installed (a client-side choice in 2.4.0, not
something a server advertises), so these tests turn xet off and exercise the classic LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
import transformers as tf
import yaml
from huggingface_hub import constants

from helpers.cli_in_process import invoke

import reshape
from reshape.card import build_card, write_card
from reshape.errors import ReshapeError
from reshape.train.distill import distill
from reshape.train.finetune import finetune
from reshape.train.loop import TrainConfig

TOKEN = "hf_reshapeTestToken0123456789abcdef"
REPO = "alice/tiny-leaner"
WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
PAPER = "arXiv 2505.20802"


# --- a local Hub ---------------------------------------------------------------------------------

@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


class LocalHub:
    """The Hub's upload endpoints, in memory. With `fail_with` set, every request whose path contains
    `fail_on` is answered with that HTTP status, as a Hub refusing the push would."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> content, uploaded but not necessarily committed
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self.fail_on: str = ""  # only requests whose path contains this fail
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

            def do_PUT(self):
                hub.handle(self, "PUT")

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # request plumbing

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        body = _read_body(request)
        self.requests.append({"method": method, "path": request.path, "body": body,
                              "headers": {k.lower(): v for k, v in request.headers.items()}})
        if self.fail_with and self.fail_on in request.path:
            return _reply(request, self.fail_with, {"error": f"refused with {self.fail_with}"})
        path = request.path.split("?")[0]
        if path.startswith("/lfs/"):  # the "presigned" storage URLs: no Hub token, as on S3
            return self.lfs_storage(request, method, path, body)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _reply(request, 401, {"error": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(request, json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(request, json.loads(body))
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self.lfs_batch(request, json.loads(body))
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5])
            if repo_id not in self.repos:
                return _reply(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            handler = {"preupload": self.preupload, "commit": self.commit, "branch": self.create_branch}[action]
            return handler(request, repo_id, revision, body)
        return _reply(request, 404, {"error": f"no such endpoint: {method} {path}"})

    # endpoints

    def create_repo(self, request, payload):
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return _reply(request, 409, {"error": "You already created this model repo", "url": self.repo_url(repo_id)})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return _reply(request, 200, {"url": self.repo_url(repo_id), "name": repo_id})

    def create_branch(self, request, repo_id, branch, body):
        repo = self.repos[repo_id]
        if branch in repo.branches:
            return _reply(request, 409, {"error": "Branch already exists"})
        repo.branches[branch] = dict(repo.branches["main"])
        return _reply(request, 200, {})

    def validate_yaml(self, request, payload):
        content = payload["content"]
        try:
            yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
        except yaml.YAMLError as e:
            return _reply(request, 400, {"errors": [{"message": str(e)}], "warnings": []})
        return _reply(request, 200, {"errors": [], "warnings": []})

    def preupload(self, request, repo_id, revision, body):
        files = json.loads(body)["files"]
        # As the Hub's default .gitattributes: weights go to LFS, and so does anything over 10 MB.
        answer = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") or
                   f["size"] > 10 * 1024 * 1024 else "regular", "shouldIgnore": False,
                   "oid": None} for f in files]
        return _reply(request, 200, {"files": answer, "commitOid": "0" * 40})

    def lfs_batch(self, request, payload):
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"},
                                "verify": {"href": f"{self.url}/lfs/{o['oid']}/verify"}}}
                   for o in payload["objects"]]
        return _reply(request, 200, {"transfer": "basic", "objects": objects})  # basic transfer: no xet

    def lfs_storage(self, request, method, path, body):
        oid = path.split("/")[2]
        if method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                return _reply(request, 400, {"error": "content does not match its oid"})
            self.lfs[oid] = body
            return _reply(request, 200, {})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _reply(request, 401, {"error": "verify needs the token"})
        ok = oid in self.lfs and len(self.lfs[oid]) == json.loads(body)["size"]
        return _reply(request, 200 if ok else 404, {})

    def commit(self, request, repo_id, revision, body):
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        if header["key"] != "header" or revision not in repo.branches:
            return _reply(request, 400, {"error": "bad commit"})
        files, kinds = {}, {}
        for op in operations:
            value = op["value"]
            if op["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif op["key"] == "lfsFile":
                content = self.lfs.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    return _reply(request, 422, {"error": f"LFS object of {value['path']} was not uploaded"})
                files[value["path"]] = content
            else:
                return _reply(request, 400, {"error": f"unexpected operation {op['key']}"})
            kinds[value["path"]] = op["key"]
        repo.branches[revision].update(files)  # the whole commit lands at once
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"branch": revision, "summary": header["value"]["summary"], "kinds": kinds, "oid": oid})
        return _reply(request, 200, {"commitUrl": f"{self.repo_url(repo_id)}/commit/{oid}", "commitOid": oid,
                                     "pullRequestUrl": None})

    def repo_url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"


def _read_body(request: BaseHTTPRequestHandler) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed file uploads
        data = b""
        while True:
            size = int(request.rfile.readline().split(b";")[0], 16)
            if size == 0:
                request.rfile.readline()
                return data
            data += request.rfile.read(size)
            request.rfile.readline()
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    request.send_response(status)
    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        request.send_header(key, value)
    request.end_headers()
    request.wfile.write(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT with a WordPiece tokenizer and an MIT-licensed card, a 3-layer student converted from
    it, and a CSV task whose label is whether a review uses a positive word."""
    root = tmp_path_factory.mktemp("push")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=16))
    teacher.save_pretrained(root / "teacher")
    tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(root / "teacher")
    (root / "teacher" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# A tiny BERT\n")
    reshape.convert(str(root / "teacher"), root / "student", heads=4, depth=3)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(60):
        word = WORDS[int(torch.randint(0, 6, (1,), generator=g))]
        rows.append(f"the film was very {word},{int(word in WORDS[:3])}")
    (root / "reviews.csv").write_text("review,positive\n" + "\n".join(rows) + "\n")
    (root / "text.txt").write_text("\n".join(r.split(",")[0] for r in rows) + "\n")
    return root


@pytest.fixture
def hub(monkeypatch):
    """A running local Hub that huggingface_hub talks to, with the token in HF_TOKEN."""
    server = LocalHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by reshape at call time
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turns offline mode on
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # classic LFS path, see the module docstring
    yield server
    server.close()


@pytest.fixture
def student(folders, tmp_path) -> Path:
    """A copy of the converted student with training leftovers that must stay local."""
    folder = Path(shutil.copytree(folders / "student", tmp_path / "tiny-leaner"))
    (folder / "checkpoints" / "last").mkdir(parents=True)
    (folder / "checkpoints" / "last" / "optimizer.bin").write_bytes(b"\0" * 64)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")
    return folder


STUDENT_FILES = ["README.md", "config.json", "model.safetensors", "reshape.json", "tokenizer.json",
                 "tokenizer_config.json"]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def assert_token_only_in_authorization(requests: list[dict]) -> None:
    assert requests
    for r in requests:
        assert TOKEN not in r["path"] and TOKEN.encode() not in r["body"], r["path"]
        for name, value in r["headers"].items():
            if TOKEN in value:
                assert name == "authorization" and value == f"Bearer {TOKEN}", name


# --- push -----------------------------------------------------------------------------------------

def test_push_uploads_the_folder_as_one_commit(hub, student, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    result = reshape.push(student, REPO, commit_message="first upload")
    repo = hub.repos[REPO]
    assert not repo.private
    assert [c["summary"] for c in repo.commits] == ["first upload"] and repo.commits[0]["branch"] == "main"
    assert sorted(repo.branches["main"]) == STUDENT_FILES  # no checkpoints/, metrics.jsonl or hidden files
    assert [f["path"] for f in result["files"]] == STUDENT_FILES
    assert [f["size"] for f in result["files"]] == [(student / p).stat().st_size for p in STUDENT_FILES]
    for path in STUDENT_FILES:
        assert repo.branches["main"][path] == (student / path).read_bytes(), path
    weights = (student / "model.safetensors").read_bytes()
    assert hashlib.sha256(repo.branches["main"]["model.safetensors"]).hexdigest() == hashlib.sha256(weights).hexdigest()
    assert repo.commits[0]["kinds"]["model.safetensors"] == "lfsFile"  # through the LFS batch API and a PUT
    assert repo.commits[0]["kinds"]["config.json"] == "file"
    assert [r["path"] for r in hub.requests if r["method"] == "PUT"] == [f"/lfs/{hashlib.sha256(weights).hexdigest()}"]
    meta = front_matter(repo.branches["main"]["README.md"].decode())
    assert meta["license"] == "mit" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["reshape", "more-heads-less-depth", "fill-mask"] and meta["pipeline_tag"] == "fill-mask"
    assert result["commit"] == repo.commits[0]["oid"]
    assert result["url"] == f"{hub.url}/{REPO}/commit/{repo.commits[0]['oid']}"
    assert_token_only_in_authorization(hub.requests)
    assert {r["path"].split("?")[0] for r in hub.requests if "authorization" in r["headers"]} >= {
        "/api/repos/create", f"/api/models/{REPO}/preupload/main", f"/api/models/{REPO}/commit/main"}
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err + caplog.text


def test_push_again_to_an_existing_repo_adds_a_commit(hub, student):
    reshape.push(student, REPO)
    (student / "README.md").write_text((student / "README.md").read_text() + "\nUpdated.\n")
    reshape.push(student, REPO)
    repo = hub.repos[REPO]
    assert len(repo.commits) == 2 and repo.branches["main"]["README.md"].endswith(b"Updated.\n")
    assert [c["summary"] for c in repo.commits] == ["Upload tiny-leaner (reshape)"] * 2


def test_dry_run_uploads_nothing_and_needs_no_token(hub, student, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(student.parent / "no-token"))
    before = {p: p.stat().st_mtime_ns for p in student.rglob("*")}
    result = reshape.push(student, REPO, dry_run=True)
    assert hub.requests == [] and hub.repos == {}
    assert {p: p.stat().st_mtime_ns for p in student.rglob("*")} == before
    assert result["dry_run"] and result["url"] is None and result["commit"] is None
    assert [f["path"] for f in result["files"]] == STUDENT_FILES
    assert result["card"] == (student / "README.md").read_text()


# --- bad input ------------------------------------------------------------------------------------

def test_no_token_is_refused(hub, student, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(student.parent / "no-token"))
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, REPO)
    assert str(e.value) == "token=None: no Hugging Face token found; set HF_TOKEN or run `hf auth login`"
    assert hub.requests == []


def test_the_login_token_is_used_without_hf_token(hub, student, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    token_file = student.parent / "token"
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    reshape.push(student, REPO)
    assert len(hub.repos[REPO].commits) == 1


@pytest.mark.parametrize("repo", ["tiny-leaner", "alice/bob/tiny", "alice/tiny leaner", "alice/tiny--leaner",
                                  "-alice/tiny", "alice/"])
def test_a_bad_repo_id_is_refused(hub, student, repo):
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, repo)
    assert str(e.value) == (f"repo={repo}: is not a Hub repo id of the form OWNER/NAME (letters, digits, '-', '_', "
                            f"'.'); pass e.g. --repo your-name/minilm-leaner")
    assert hub.requests == []


def _break(folder: Path, how: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if how == "no-config":
        (folder / "config.json").unlink()
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "missing-layer":
        config["num_hidden_layers"] += 1
    elif how == "wrong-shape":
        config["intermediate_size"] = 48
    if how in ("missing-layer", "wrong-shape"):
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how, reason", [
    ("no-config", "is not a model folder (it needs config.json and weights); pass the output folder of reshape "
                  "convert, distill or finetune"),
    ("no-weights", "is not a model folder (it needs config.json and weights); pass the output folder of reshape "
                   "convert, distill or finetune"),
    ("missing-layer", "loads with 16 weights missing or of the wrong shape (e.g. bert.encoder.layer.3.attention."
                      "output.LayerNorm.bias); push a complete output folder of reshape convert, distill or finetune"),
    ("wrong-shape", "loads with 9 weights missing or of the wrong shape (e.g. bert.encoder.layer.0.intermediate.dense."
                    "bias); push a complete output folder of reshape convert, distill or finetune"),
])
def test_a_folder_that_does_not_reload_is_refused(hub, student, how, reason):
    _break(student, how)
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, REPO, dry_run=how == "wrong-shape")  # the dry run checks it too
    assert str(e.value) == f"folder={student}: {reason}"
    assert hub.requests == []


@pytest.mark.parametrize("status, fail_on, message", [
    (401, "", "token=(hidden): was rejected by {url} (HTTP 401); nothing was committed; set HF_TOKEN or run "
              "`hf auth login` with a valid token"),
    (403, "", f"repo={REPO}: cannot be written with this token (HTTP 403); nothing was committed; use a token with "
              "write access to the repo's owner, or push to your own namespace"),
    (409, "/commit/", f"repo={REPO}: conflict on main (HTTP 409: another change is in progress or the branch moved); "
                      "nothing was committed; push again"),
])
def test_hub_refusals_are_one_line_errors_and_commit_nothing(hub, student, status, fail_on, message):
    hub.fail_with, hub.fail_on = status, fail_on
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, REPO)
    assert str(e.value) == message.format(url=hub.url)
    assert all(not repo.commits for repo in hub.repos.values())
    assert TOKEN not in str(e.value)
    if status == 409:  # the files were uploaded, then the commit was refused: nothing is on the branch
        assert hub.repos[REPO].branches["main"] == {} and hub.lfs


def test_an_unreachable_endpoint_is_a_one_line_error(hub, student, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, REPO)
    assert str(e.value) == (f"endpoint={endpoint}: cannot be reached (ConnectError); nothing was committed; check the "
                            "network connection and HF_ENDPOINT, then push again")
    assert hub.requests == []


def test_offline_mode_is_a_one_line_error(hub, student, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReshapeError) as e:
        reshape.push(student, REPO)
    assert str(e.value) == ("HF_HUB_OFFLINE=1: offline mode blocks the upload; unset HF_HUB_OFFLINE (and "
                            "TRANSFORMERS_OFFLINE) to push")
    assert hub.requests == []


# --- the command line -----------------------------------------------------------------------------

def cli_env(hub: LocalHub, home: Path) -> dict:
    """What a process started for the Hub would see (the `hub` fixture has set HF_ENDPOINT, HF_TOKEN and
    turned xet off): online, and a home of its own."""
    assert os.environ["HF_ENDPOINT"] == hub.url and os.environ["HF_TOKEN"] == TOKEN
    return {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1"}


def run_cli(env: dict, *args):
    """`reshape ARGS` in this process (tests/test_cli_smoke.py runs `reshape push` as a process)."""
    return invoke(*args, env=env)


def test_cli_push_to_a_private_branch(hub, student, tmp_path):
    env = cli_env(hub, tmp_path / "home")
    done = run_cli(env, "push", student, "--repo", REPO, "--private", "--revision", "dev",
                   "--commit-message", "from the CLI", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    repo = hub.repos[REPO]
    assert repo.private and repo.branches["main"] == {} and sorted(repo.branches["dev"]) == STUDENT_FILES
    assert [(c["branch"], c["summary"]) for c in repo.commits] == [("dev", "from the CLI")]
    assert result["revision"] == "dev" and result["commit"] == repo.commits[0]["oid"]
    assert_token_only_in_authorization(hub.requests)
    assert TOKEN not in done.stdout + done.stderr


def test_cli_refusal_exits_2_with_one_line(hub, student, monkeypatch):
    from typer.testing import CliRunner

    from reshape.cli import app

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(student.parent / "no-token"))
    done = CliRunner().invoke(app, ["push", str(student), "--repo", REPO])  # in-process: the import is paid
    assert done.exit_code == 2 and done.exception is not None and not done.stdout
    assert done.stderr.splitlines() == [
        "error: token=None: no Hugging Face token found; set HF_TOKEN or run `hf auth login`"]
    assert hub.requests == []


def test_cli_convert_push_to_hub(hub, folders, tmp_path):
    out = tmp_path / "converted"
    done = run_cli(cli_env(hub, tmp_path / "home"), "convert", folders / "teacher", "-o", out, "--heads", 4,
                   "--depth", 2, "--push-to-hub", REPO, "--quiet")
    assert done.returncode == 0, done.stderr
    files = hub.repos[REPO].branches["main"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "reshape.json", "tokenizer.json",
                             "tokenizer_config.json"]
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert json.loads(files["reshape.json"])["plan"]["keep"] == [0, 3]


# --- the model card -------------------------------------------------------------------------------

def test_card_of_a_convert_output(folders):
    card = (folders / "student" / "README.md").read_text()
    assert front_matter(card) == {"library_name": "transformers", "license": "mit", "pipeline_tag": "fill-mask",
                                  "tags": ["reshape", "more-heads-less-depth", "fill-mask"]}
    assert "# student\n" in card and f"`teacher` rebuilt by reshape {reshape.__version__}" in card
    assert str(folders) not in card  # local paths stay local
    for row in ("| layers | 4 | 3 |", "| attention heads | 2 | 4 |", "| KV heads | 2 | 4 |", "| head dim | 16 | 8 |",
                "| MLP width | 64 | 64 |", "- Kept source layers: 0, 2, 3",
                "- Head mode: keep-width; head split: aware, fitted on random inputs"):
        assert row in card, row
    recipe = json.loads((folders / "student" / "reshape.json").read_text())
    params = recipe["params"]
    assert f"| parameters | {params['source']['total']:,} | {params['result']['total']:,} |" in card
    assert f"({params['saved_fraction']:.1%} of the source's)" in card
    assert "has not been distilled or fine-tuned yet" in card and "## How it was recovered" not in card
    assert 'AutoModelForMaskedLM.from_pretrained("student")' in card
    assert PAPER in card and "Leaner Transformers: More Heads, Less Depth" in card and "@misc{" in card


def test_a_timm_folder_is_checked_with_timm_and_carded_for_timm(hub, tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=64,
                               depth=4, num_heads=4, num_classes=5)
    save_for_hf(source, tmp_path / "vit", safe_serialization=True)
    reshape.convert(str(tmp_path / "vit"), tmp_path / "vit-leaner", heads=8, depth=2)
    result = reshape.push(tmp_path / "vit-leaner", REPO)
    assert sorted(hub.repos[REPO].branches["main"]) == ["README.md", "config.json", "model.safetensors",
                                                        "reshape.json"]
    card = result["card"]
    assert front_matter(card)["library_name"] == "timm" and front_matter(card)["pipeline_tag"] == "image-classification"
    assert 'timm.create_model("local-dir:vit-leaner", pretrained=True)' in card
    config = json.loads((tmp_path / "vit-leaner" / "config.json").read_text())
    config["model_args"]["depth"] = 3  # one block more than the weights hold
    (tmp_path / "vit-leaner" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReshapeError, match=r"folder=.*vit-leaner: does not load with plain transformers/timm "
                                           r"\(RuntimeError: Error\(s\) in loading state_dict"):
        reshape.push(tmp_path / "vit-leaner", REPO, dry_run=True)


def test_card_of_a_minilm_convert_inherits_the_hub_id_and_license(tmp_path):
    reshape.convert("minilm", tmp_path / "minilm-leaner", heads=24, depth=4, head_split="contiguous")
    meta = front_matter((tmp_path / "minilm-leaner" / "README.md").read_text())
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "sentence-similarity"  # the source card's: the model keeps its role


def test_card_of_a_finetune_output(folders, tmp_path):
    out = tmp_path / "tiny-sentiment"
    result = finetune(folders / "student", out, task="seq-cls", data=str(folders / "reviews.csv"),
                      label_column="positive", config=TrainConfig(max_steps=2, batch_size=16, lr=1e-3))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    validation, test = result["validation"], result["test"]
    assert meta["license"] == "mit"  # from the student's card, which has it from the teacher's
    assert meta["tags"] == ["reshape", "more-heads-less-depth", "text-classification"]
    assert "datasets" not in meta  # a local CSV is not a Hub dataset
    assert meta["model-index"] == [{"name": "tiny-sentiment", "results": [{
        "task": {"type": "text-classification"},
        "dataset": {"name": "reviews.csv", "type": "reviews.csv", "split": split},
        "metrics": [{"type": "accuracy", "value": round(scores["accuracy"], 4), "name": f"{split} accuracy"},
                    {"type": "f1", "value": round(scores["f1"], 4), "name": f"{split} macro F1"}]}
        for split, scores in (("validation", validation), ("test", test))]}]
    assert "| layers | 4 | 3 |" in card  # what changed, from the student's reshape.json
    assert "### Fine-tuning" in card
    assert "- Task: seq-cls; data: `reviews.csv` (43 training, 5 validation, 12 test examples)" in card
    assert "- 2 optimizer steps, batch 16 x 1 accumulation, peak learning rate 0.001, seed 0" in card
    assert (f"- Validation (picks the checkpoint), step 2: accuracy {validation['accuracy']:.4f}, "
            f"macro F1 {validation['f1']:.4f}") in card
    assert f"- Test (scored once), step 2: accuracy {test['accuracy']:.4f}, macro F1 {test['f1']:.4f}" in card
    assert 'AutoModelForSequenceClassification.from_pretrained("tiny-sentiment")' in card
    assert json.loads((out / "finetune.json").read_text())["config"]["batch_size"] == 16


def test_card_of_a_distill_output_with_a_savings_report(folders, tmp_path):
    out = tmp_path / "tiny-distilled"
    distill(folders / "teacher", folders / "student", out, data=folders / "text.txt",
            config=TrainConfig(max_steps=2, batch_size=16))
    card = (out / "README.md").read_text()
    assert "### Distillation" in card and "- Teacher: `teacher`; data: `text.txt` (unlabelled text)" in card
    assert "- Student layers learn teacher layers 0, 2, 3 in order; loss weights: kl 1, hidden 1" in card
    assert "has not been distilled" not in card and front_matter(card)["license"] == "mit"
    reshape.report(folders / "teacher", out, batch_sizes=(1,), seq_len=8, repeats=1, kappa=False,
                   out=out / "report")
    table = (out / "report" / "report.md").read_text().strip()
    card = write_card(out)
    assert "## Savings report\n\n" + table in card
    assert str(build_card(out)) == card


def test_the_auto_classes_the_card_names_without_importing_transformers_exist():
    from reshape.card import COMMON_AUTO_CLASSES, auto_class

    assert all(hasattr(tf, name) for name in COMMON_AUTO_CLASSES)
    assert auto_class("LlamaForCausalLM") == "AutoModelForCausalLM"
    assert auto_class("DetrForObjectDetection") == "AutoModelForObjectDetection"  # checked in transformers
    assert auto_class("GPT2LMHeadModel") == "AutoModelForCausalLM" and auto_class("BertModel") == "AutoModel"
