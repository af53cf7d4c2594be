"""`reshape distill` and `reshape finetune` under `accelerate launch` with FSDP2, on two CPU processes (gloo).

accelerate 1.15 shards with FSDP on accelerators only: on CPU processes it drops the FSDP plugin and runs
DDP, which reshape refuses (test_accelerate_ignoring_fsdp_on_cpu_is_refused). fsdp_on_cpu/sitecustomize.py,
on PYTHONPATH for these runs only, turns FSDP on for CPU processes where AcceleratorState turns it on for a
GPU; from there on, accelerate's own FSDP2 code runs: fully_shard, gradient clipping, sharded save_state
and load_state, and the gathered state dict reshape saves. The accelerate config is the shipped
examples/accelerate_fsdp.yaml with only the machine's settings changed (CPU, 2 processes, no mixed
precision, the model's block class).

Tiny models with no dropout, on rows of one length (so a batch of 16 and two batches of 8 are the same
rows in the same order): two processes of 8 must track one process of 16.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import load_file

import reshape

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "examples" / "accelerate_fsdp.yaml"
SHIM = Path(__file__).parent / "fsdp_on_cpu"
WORDS = ["good", "fine", "nice", "poor", "dull", "sour"]  # one length: length-grouped batches keep their order
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
FSDP_ON_CPU = {**ENV, "ACCELERATE_USE_CPU": "1", "RESHAPE_TEST_FSDP_ON_CPU": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIM), os.environ.get("PYTHONPATH")]))}
# 134 rows: 96 train (6 steps of 16 an epoch, so --steps 10 crosses into a second epoch), 11 validation, 27 test.
DISTILL = ["--data", "text.txt", "--steps", "10", "--eval-every", "5", "--save-every", "4", "--lr", "3e-3",
           "--keep-checkpoints", "--json"]


def cpu_config(folder: Path, block: str) -> Path:
    """The shipped FSDP2 config, for two CPU processes: only the machine's settings change."""
    config = yaml.safe_load(SHIPPED.read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = block
    path = folder / f"fsdp_{block}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *args, env=FSDP_ON_CPU, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port: another launch (the DDP test, an xdist worker) may hold 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--main_process_port", str(port), "-m", "reshape.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reshape.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(out: Path) -> dict[str, float]:
    """What a run logged: the training loss and every validation and test score, by step."""
    found = {}
    for r in records(out):
        for kind in ("loss", "validation", "test"):
            if kind in r:
                value = r[kind] if kind == "loss" else r[kind]["distill_loss" if "distill_loss" in r[kind] else "score"]
                found[f"{kind}@{r['step']}"] = value
    return found


def assert_weights_track(a: dict, b: dict, start: dict, rel: float, floor: float = 1e-6) -> None:
    """Each tensor of `a` within rel of `b`, measured against how far `b` moved from `start`, give or take a
    float32 noise floor: an attention key bias, which cannot change the output, only drifts by ~1e-7."""
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).norm() <= rel * (b[name] - start[name]).norm() + floor, name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny LLaMA teacher (4 layers, 4 heads over 2 KV heads) and its 3-layer, 8-head student; a tiny BERT
    student for sequence classification; text and labelled reviews; the shipped config made for CPU."""
    root = tmp_path_factory.mktemp("fsdp")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=96, vocab_size=len(vocab),
                                               max_position_embeddings=32, pad_token_id=0))
    llama.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    reshape.convert(str(root / "teacher"), root / "student", heads=8, depth=3)
    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    reshape.convert(str(root / "bert"), root / "bert-student", heads=4, depth=3)
    g = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(0, 6, (134,), generator=g)]
    (root / "text.txt").write_text("".join(f"the film was very {w}\n" for w in words))
    (root / "reviews.csv").write_text("review,positive\n" + "".join(
        f"the film was very {w},{int(w in WORDS[:3])}\n" for w in words))
    cpu_config(root, "LlamaDecoderLayer")
    cpu_config(root, "BertLayer")
    return root


@pytest.fixture(scope="module")
def fsdp_distill(folders):
    """`reshape distill` of the LLaMA student on two FSDP2 processes, 10 steps of 2 x 8 rows."""
    done = launch(folders / "fsdp_LlamaDecoderLayer.yaml", "distill", "--teacher", "teacher", "--student", "student",
                  *DISTILL, "--batch-size", 8, "-o", "fsdp", cwd=folders)
    assert done.returncode == 0, done.stderr[-3000:]
    return folders / "fsdp", json.loads(done.stdout)


@pytest.mark.integration
@pytest.mark.slow
def test_distill_on_two_fsdp2_processes_tracks_one_process(folders, fsdp_distill):
    out, summary = fsdp_distill
    assert summary["processes"] == 2 and summary["steps"] == 10
    single = one_process("distill", "--teacher", "teacher", "--student", "student", *DISTILL, "--batch-size", 16,
                         "-o", "single", cwd=folders)
    assert single.returncode == 0, single.stderr[-3000:]
    # The loss of each global batch (logged as the mean over both processes), the validation distillation
    # loss at steps 5 and 10 and the test one: measured ~1e-6 apart (float sums in another order).
    sharded, whole = numbers(out), numbers(folders / "single")
    assert sharded.keys() == whole.keys() == {"validation@5", "loss@10", "validation@10", "test@10"}
    assert sharded == pytest.approx(whole, rel=1e-4)
    # Weights: each tensor within 0.1% of how far training moved it (measured ~1e-5).
    assert_weights_track(load_file(out / "model.safetensors"), load_file(folders / "single" / "model.safetensors"),
                         load_file(folders / "student" / "model.safetensors"), rel=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_gives_the_uninterrupted_weights(folders, fsdp_distill):
    straight, _ = fsdp_distill
    args = ["distill", "--teacher", "teacher", "--student", "student", *DISTILL, "--batch-size", 8, "-o", "crashed"]
    # Every process exits at its 9th optimizer step (after the checkpoint of step 8, in the second epoch).
    crashed = launch(folders / "fsdp_LlamaDecoderLayer.yaml", *args, cwd=folders,
                     env={**FSDP_ON_CPU, "RESHAPE_TEST_EXIT_AT_STEP": "9"})
    assert crashed.returncode != 0 and not (folders / "crashed" / "model.safetensors").exists()
    last = folders / "crashed" / "checkpoints" / "last"
    assert json.loads((last / "reshape_train_state.json").read_text())["step"] == 8
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard per process, not a gathered copy
        assert sorted(p.name for p in (last / part).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"} <= {p.name for p in last.iterdir()}

    resumed = launch(folders / "fsdp_LlamaDecoderLayer.yaml", *args, "--resume", cwd=folders)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(straight / "model.safetensors"), load_file(folders / "crashed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in records(folders / "crashed") if "validation" in r or "test" in r] == \
        [r for r in records(straight) if "validation" in r or "test" in r]


@pytest.mark.integration
def test_the_fsdp2_output_is_a_full_model_that_loads_without_reshape(fsdp_distill):
    out, _ = fsdp_distill
    script = (
        "import json, sys, torch, transformers as tf\n"
        "from safetensors.torch import load_file\n"
        f"out = {str(out)!r}\n"
        "model = tf.AutoModelForCausalLM.from_pretrained(out)\n"
        "saved = load_file(out + '/model.safetensors')\n"
        "loaded = model.state_dict()\n"
        "ok = saved.keys() == loaded.keys() and all(torch.equal(v, loaded[k]) for k, v in saved.items())\n"
        "print(json.dumps({'reshape': 'reshape' in sys.modules, 'cls': type(model).__name__, 'same': ok,\n"
        "    'arch': model.config.architectures, 'layers': model.config.num_hidden_layers,\n"
        "    'heads': model.config.num_attention_heads,\n"
        "    'q': list(saved['model.layers.0.self_attn.q_proj.weight'].shape),\n"
        "    'embed': list(saved['model.embed_tokens.weight'].shape)}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd="/",
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # Whole tensors (the student's 64-wide q_proj over 8 heads, all 15 embeddings), not one process's half.
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "reshape": False, "cls": "LlamaForCausalLM", "same": True, "arch": ["LlamaForCausalLM"], "layers": 3,
        "heads": 8, "q": [64, 64], "embed": [15, 64]}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora", 4]], ids=["full", "lora"])
def test_finetune_on_two_fsdp2_processes_tracks_one_process(folders, lora, tmp_path):
    """With --lora the adapters are merged into the sharded weights: that merge once missed the pooler's,
    which FSDP2 had left gathered after the last forward (its change went to a copy)."""
    args = ["finetune", folders / "bert-student", "--task", "seq-cls", "--data", folders / "reviews.csv",
            "--label-column", "positive", "--epochs", 1, "--eval-every", 2, "--lr", "3e-3", *lora, "--json"]
    sharded = launch(folders / "fsdp_BertLayer.yaml", *args, "--batch-size", 8, "-o", "fsdp", cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single = one_process(*args, "--batch-size", 16, "-o", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # One epoch of the 96 training rows is 6 steps either way (it was 12 on 2 processes: each process's
    # share of the batches was counted as the whole).
    assert [(r["processes"], r["steps"]) for r in map(json.loads, (sharded.stdout, single.stdout))] == [(2, 6), (1, 6)]
    a, b = numbers(tmp_path / "fsdp"), numbers(tmp_path / "single")
    assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-4)
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp")
    assert model.config.architectures == ["BertForSequenceClassification"] and model.config.num_hidden_layers == 3
    # Against the student's weights; the new pooler and task head (the same seeded draws in both runs) against 0.
    whole = load_file(tmp_path / "single" / "model.safetensors")
    student = load_file(folders / "bert-student" / "model.safetensors")
    start = {k: student.get(k, torch.zeros_like(v)) for k, v in whole.items()}
    assert_weights_track(load_file(tmp_path / "fsdp" / "model.safetensors"), whole, start, rel=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_accelerate_ignoring_fsdp_on_cpu_is_refused(folders):
    """Without the shim, accelerate 1.15 never shards on CPU, silently: reshape refuses both ways it goes wrong,
    before writing anything."""
    config = folders / "fsdp_LlamaDecoderLayer.yaml"
    args = ["distill", "--teacher", "teacher", "--student", "student", "--data", "text.txt", "--steps", 1]
    # use_cpu in an FSDP config does not reach the processes: each finds no GPU and runs alone.
    alone = launch(config, *args, "-o", "alone", env=ENV, cwd=folders)
    assert alone.returncode != 0 and not (folders / "alone").exists()
    assert "error: WORLD_SIZE=2: processes were started, but accelerate runs each alone" in alone.stderr
    # CPU processes: accelerate turns FSDP on for accelerators only, and would replicate the model (DDP).
    replicated = launch(config, *args, "-o", "replicated", env={**ENV, "ACCELERATE_USE_CPU": "1"}, cwd=folders)
    assert replicated.returncode != 0 and not (folders / "replicated").exists()
    assert "error: distributed_type=FSDP: is ignored by accelerate on MULTI_CPU" in replicated.stderr


def test_the_shipped_accelerate_configs_load_in_accelerate():
    """Every accelerate config under examples/ loads as accelerate's launcher reads it, and the FSDP one asks
    for what reshape supports and the tests above run: FSDP2, sharded checkpoints, a block class transformers has."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    configs = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if "distributed_type" in p.read_text()]
    assert SHIPPED in configs
    for path in configs:
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type in set(DistributedType), path
    config = ClusterConfig.from_yaml_file(str(SHIPPED))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert hasattr(tf, fsdp["fsdp_transformer_layer_cls_to_wrap"])
    # What `accelerate launch --config_file` hands the processes.
    args = launch_command_parser().parse_args(["--config_file", str(SHIPPED), "-m", "reshape.cli", "distill"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp and args.num_processes == 8 and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE",
                                "FSDP_TRANSFORMER_CLS_TO_WRAP")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": fsdp["fsdp_transformer_layer_cls_to_wrap"]}


def test_a_timm_classifier_saves_the_weights_gathered_from_fsdp2_shards(tmp_path):
    """Under FSDP2 the model's own weights are shards: the timm folder gets the gathered ones, without the
    wrapper's `model.` prefix, and timm loads it. (A 2-process FSDP2 finetune of this ViT, run by hand,
    matched one process: same losses and scores, weights within 8e-6.)"""
    import timm

    from reshape.train.timm_task import TimmClassifier

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=2)
    classifier = TimmClassifier(vit, ["dark", "light"])
    gathered = {k: v + 1 for k, v in classifier.state_dict().items()}  # not the weights the model holds
    classifier.save_pretrained(tmp_path / "out", state_dict=gathered)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == vit.state_dict().keys()
    assert all(torch.equal(saved[k], gathered[f"model.{k}"]) for k in saved)
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert reloaded.num_classes == 2 and torch.equal(reloaded.head.weight, gathered["model.head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["label_names"] == ["dark", "light"]
