"""Fine-tuning, evaluation and distillation on tiny models and tiny in-code data."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from helpers.cli_in_process import invoke

import reshape
from reshape.errors import ReshapeError
from reshape.families.timm_vit import TIMM_VIT
from reshape.train.distill import distill
from reshape.train.finetune import evaluate, finetune
from reshape.train.losses import DistillWeights
from reshape.train.loop import TrainConfig

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT with a real WordPiece tokenizer, a 3-layer student converted from it, and a CSV task
    whose label is whether a review uses a positive word."""
    root = tmp_path_factory.mktemp("recover")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    teacher = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=16))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    reshape.convert(str(root / "teacher"), root / "student", heads=4, depth=3)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(120):
        word = WORDS[int(torch.randint(0, 6, (1,), generator=g))]
        rows.append(f"the film was very {word},{int(word in WORDS[:3])}")
    (root / "reviews.csv").write_text("review,positive\n" + "\n".join(rows) + "\n")
    (root / "text.txt").write_text("\n".join(r.split(",")[0] for r in rows) + "\n")
    return root


def test_finetune_learns_the_task_and_eval_agrees(folders, tmp_path):
    out = tmp_path / "ft"
    result = finetune(folders / "student", out, task="seq-cls", data=str(folders / "reviews.csv"),
                      label_column="positive", config=TrainConfig(max_steps=60, batch_size=16, lr=3e-3))
    assert result["steps"] == 60 and (result["validation_examples"], result["test_examples"]) == (10, 24)
    assert result["validation"]["accuracy"] == 1.0  # one word decides the label: a tiny model learns it
    assert result["test"]["accuracy"] == 1.0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "finetune.json", "metrics.jsonl",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    scored = evaluate(out, task="seq-cls", data=str(folders / "reviews.csv"), label_column="positive")
    assert scored["accuracy"] == result["test"]["accuracy"] and scored["examples"] == 24
    on_validation = evaluate(out, task="seq-cls", data=str(folders / "reviews.csv"), label_column="positive",
                             split="validation")
    assert on_validation["accuracy"] == result["validation"]["accuracy"] and on_validation["examples"] == 10


def test_a_checkpoint_stored_in_half_precision_trains_in_float32(folders, tmp_path):
    """AdamW on float16 weights underflows: a MiniLM stored in float16 collapsed to the majority class."""
    half = tmp_path / "half"
    tf.AutoModelForMaskedLM.from_pretrained(folders / "student").half().save_pretrained(half)
    tf.AutoTokenizer.from_pretrained(folders / "student").save_pretrained(half)
    (half / "reshape.json").write_bytes((folders / "student" / "reshape.json").read_bytes())
    assert tf.AutoModelForMaskedLM.from_pretrained(half).dtype == torch.float16  # transformers keeps it
    result = finetune(half, tmp_path / "ft", task="seq-cls", data=str(folders / "reviews.csv"),
                      label_column="positive", config=TrainConfig(max_steps=60, batch_size=16, lr=3e-3))
    assert result["test"]["accuracy"] == 1.0
    assert tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft").dtype == torch.float32
    distill(folders / "teacher", half, tmp_path / "distilled", data=folders / "text.txt",
            config=TrainConfig(max_steps=2, batch_size=16))
    assert tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "distilled").dtype == torch.float32


def test_the_checkpoint_is_chosen_on_validation_never_on_test(folders, tmp_path):
    """Test labels scrambled (every one flipped), validation labels true: the model kept must be the one
    best on validation, and test is scored once, on it."""
    rows = [line.rsplit(",", 1) for line in (folders / "reviews.csv").read_text().splitlines()[1:]]
    data = tmp_path / "data"
    data.mkdir()
    for name, part, flip in (("train", rows[:80], False), ("validation", rows[80:100], False),
                             ("test", rows[100:], True)):
        lines = [f"{text},{1 - int(label) if flip else label}" for text, label in part]
        (data / f"{name}.csv").write_text("review,positive\n" + "\n".join(lines) + "\n")
    out = tmp_path / "ft"
    result = finetune(folders / "student", out, task="seq-cls", data=str(data), label_column="positive",
                      config=TrainConfig(max_steps=40, batch_size=16, lr=3e-3, eval_every=5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = [(r["validation"]["score"], -r["step"]) for r in records if "validation" in r]
    assert len(validation) == 8
    best_step = -max(validation)[1]  # the first step with the best validation score
    assert result["validation"]["step"] == best_step == result["test"]["step"]
    assert [r["step"] for r in records if "test" in r] == [40]  # one test score, written after training
    # The scrambled test split scores the chosen model badly: had test picked it, the worst step would have won.
    assert result["validation"]["accuracy"] == 1.0 and result["test"]["accuracy"] == 0.0


def test_a_new_task_head_is_seeded_whatever_ran_before(folders, tmp_path):
    weights = []
    for i, draws in enumerate((0, 1000)):
        torch.rand(draws)  # other work in the same process moves the global RNG
        finetune(folders / "student", tmp_path / str(i), task="seq-cls", data=str(folders / "reviews.csv"),
                 label_column="positive", config=TrainConfig(max_steps=2, batch_size=16))
        weights.append(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / str(i)).classifier.weight)
    assert torch.equal(*weights)


def test_log_kappa_records_each_layer_at_every_evaluation(folders, tmp_path):
    out = tmp_path / "kappa"
    finetune(folders / "student", out, task="seq-cls", data=str(folders / "reviews.csv"), label_column="positive",
             config=TrainConfig(max_steps=4, batch_size=16, eval_every=2), log_kappa=True)
    evals = [json.loads(line)["validation"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"validation"' in line]
    assert len(evals) == 2 and all(len(e["kappa"]) == 3 and min(e["kappa"]) >= 1 for e in evals)


@pytest.mark.slow
def test_lora_adapters_are_merged_into_a_plain_model(folders, tmp_path):
    out = tmp_path / "lora"
    finetune(folders / "student", out, task="seq-cls", data=str(folders / "reviews.csv"), label_column="positive",
             lora=4, config=TrainConfig(max_steps=3, batch_size=16))
    code = ("import sys, transformers; m = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]);"
            "assert not any('lora' in n for n, _ in m.named_parameters()); print(m.config.num_hidden_layers)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "3"


def test_masked_lm_perplexity(folders):
    scored = evaluate(folders / "teacher", task="masked-lm", data=str(folders / "text.txt"))
    assert scored["tokens"] > 0 and 1 < scored["perplexity"] < 1000


def test_eval_refuses_a_model_without_the_task_head(folders):
    tf.BertForSequenceClassification.from_pretrained(folders / "student", num_labels=3).save_pretrained(
        folders / "three-labels")
    with pytest.raises(ReshapeError, match="task=seq-cls: needs 2 labels but the model has"):
        evaluate(folders / "three-labels", task="seq-cls", data=str(folders / "reviews.csv"),
                 label_column="positive")


def test_distillation_brings_the_student_closer_to_its_teacher(folders, tmp_path):
    out = tmp_path / "distilled"
    result = distill(folders / "teacher", folders / "student", out, data=folders / "text.txt",  # paths are fine
                     config=TrainConfig(max_steps=40, batch_size=16, lr=3e-3, eval_every=40))
    assert result["layer_map"] == [0, 2, 3]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    assert result["validation"]["distill_loss"] < first["loss"] / 2
    recipe = json.loads((out / "reshape.json").read_text())
    assert recipe["plan"]["keep"] == [0, 2, 3] and recipe["distillation"]["steps"] == 40
    assert tf.AutoModelForMaskedLM.from_pretrained(out).config.num_attention_heads == 4


def test_attention_relation_term_trains_a_student_with_more_heads(folders, tmp_path):
    out = tmp_path / "relation"
    result = distill(str(folders / "teacher"), folders / "student", out, data=str(folders / "text.txt"),
                     weights=DistillWeights(kl=0, hidden=0, relation=1),
                     config=TrainConfig(max_steps=30, batch_size=16, lr=3e-3, log_every=1))
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert "relation" in losses[0] and "hidden" not in losses[0] and result["steps"] == 30
    assert losses[-1]["relation"] < losses[0]["relation"] / 2


def test_task_distillation_adds_the_labels_and_starts_from_the_teachers_head(folders, tmp_path):
    data = dict(data=str(folders / "reviews.csv"), label_column="positive")
    finetune(folders / "teacher", tmp_path / "teacher", task="seq-cls", **data,
             config=TrainConfig(max_steps=60, batch_size=16, lr=3e-3))
    out = tmp_path / "distilled"
    result = distill(tmp_path / "teacher", folders / "student", out, task="seq-cls", **data,
                     config=TrainConfig(max_steps=40, batch_size=16, lr=3e-3, log_every=1))
    assert result["head_from_teacher"] == ["classifier.weight", "classifier.bias"]
    assert result["test"]["accuracy"] == 1.0 and result["test"]["examples"] == 24
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert {"task", "kl", "hidden"} <= set(logged[0])
    student = tf.AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and student.config.num_labels == 2


def test_task_distillation_needs_a_fine_tuned_teacher(folders, tmp_path):
    with pytest.raises(ReshapeError, match=r"teacher=.*teacher: has no seq-cls head, but the data has 2 labels; "
                                           r"fine-tune the teacher on this data first"):
        distill(folders / "teacher", folders / "student", tmp_path / "out", task="seq-cls",
                data=str(folders / "reviews.csv"), label_column="positive")
    with pytest.raises(ReshapeError, match="task=masked-lm: has no labels for distillation"):
        distill(folders / "teacher", folders / "student", tmp_path / "out", task="masked-lm",
                data=str(folders / "text.txt"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("the user's")
    with pytest.raises(ReshapeError, match="fine-tune the teacher on this data first"):
        distill(folders / "teacher", folders / "student", tmp_path / "old", task="seq-cls", overwrite=True,
                data=str(folders / "reviews.csv"), label_column="positive")
    assert (tmp_path / "old" / "keep.txt").read_text() == "the user's"  # refused: --overwrite deleted nothing


def test_distill_needs_a_layer_map_without_reshape_json(folders, tmp_path):
    plain = tmp_path / "plain-student"
    tf.BertForMaskedLM.from_pretrained(folders / "student").save_pretrained(plain)
    tf.BertTokenizerFast.from_pretrained(folders / "student").save_pretrained(plain)
    with pytest.raises(ReshapeError, match="layer_map=None: the student has no reshape.json.*--layer-map 0,2,3"):
        distill(str(folders / "teacher"), plain, tmp_path / "out", data=str(folders / "text.txt"))
    assert not (tmp_path / "out").exists()
    result = distill(str(folders / "teacher"), plain, tmp_path / "out", data=str(folders / "text.txt"),
                     explicit_map=[1, 2, 3], config=TrainConfig(max_steps=1, batch_size=8))
    assert result["layer_map"] == [1, 2, 3]


def test_distill_refuses_a_student_of_another_family(folders, tmp_path):
    other = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=15, bos_token_id=0,
                                     eos_token_id=0)).save_pretrained(other)
    with pytest.raises(ReshapeError, match="student=.*gpt2: is a gpt2 model but the teacher is bert"):
        distill(str(folders / "teacher"), other, tmp_path / "out", data=str(folders / "text.txt"))


def test_token_classification_tags_each_word(folders, tmp_path):
    g = torch.Generator().manual_seed(1)
    tag = {w: ("POS" if w in WORDS[:3] else "NEG") for w in WORDS} | {w: "O" for w in ("the", "film", "was", "very")}
    rows = []
    for _ in range(100):
        words = [list(tag)[int(i)] for i in torch.randint(0, len(tag), (6,), generator=g)]
        rows.append(json.dumps({"words": words, "ner": [tag[w] for w in words]}))
    (tmp_path / "tags.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "tagger"
    result = finetune(folders / "student", out, task="token-cls", data=str(tmp_path / "tags.jsonl"),
                      text_column="words", label_column="ner", config=TrainConfig(max_steps=60, batch_size=16, lr=3e-3))
    assert result["test"]["accuracy"] == 1.0 and result["test"]["examples"] == 20 * 6  # one score per word
    model = tf.AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label == {0: "NEG", 1: "O", 2: "POS"}
    scored = evaluate(out, task="token-cls", data=str(tmp_path / "tags.jsonl"), text_column="words",
                      label_column="ner")
    assert scored["accuracy"] == 1.0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of 16x16 grayscale images: dark and light, with noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for label, level in (("dark", 40), ("light", 215)):
        (root / label).mkdir()
        for i in range(24):
            noise = torch.randint(-30, 30, (16, 16), generator=g)
            Image.fromarray((level + noise).clamp(0, 255).byte().numpy(), mode="L").save(root / label / f"{i}.png")
    return root


def test_image_classification_on_an_image_folder(images, tmp_path):
    torch.manual_seed(0)
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=16, patch_size=8)
    tf.ViTModel(config).save_pretrained(tmp_path / "vit")
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    out = tmp_path / "classifier"
    result = finetune(tmp_path / "vit", out, task="image-cls", data=str(images),
                      config=TrainConfig(max_steps=20, batch_size=8, lr=3e-3))
    assert result["test"]["accuracy"] == 1.0 and result["test_examples"] == 10
    assert tf.AutoModelForImageClassification.from_pretrained(out).config.id2label == {0: "dark", 1: "light"}
    assert (out / "preprocessor_config.json").is_file()
    assert evaluate(out, task="image-cls", data=str(images))["accuracy"] == 1.0


def test_timm_image_classification_saves_a_timm_folder(images, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0)
    TIMM_VIT.save(model, None, tmp_path / "vit")  # a timm folder, as convert writes one
    out = tmp_path / "classifier"
    result = finetune(tmp_path / "vit", out, task="image-cls", data=str(images),
                      config=TrainConfig(max_steps=20, batch_size=8, lr=3e-3))
    assert result["test"]["accuracy"] == 1.0
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert reloaded.num_classes == 2 and json.loads((out / "config.json").read_text())["label_names"] == ["dark", "light"]
    assert evaluate(out, task="image-cls", data=str(images))["accuracy"] == 1.0
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{w},{i % 2}\n" for i, w in enumerate("abcdefghij")))
    with pytest.raises(ReshapeError, match="task=seq-cls: does not fit the timm image model"):
        evaluate(out, task="seq-cls", data=str(tmp_path / "t.csv"))


def test_embedding_eval_compares_with_the_teacher(folders):
    same = evaluate(folders / "teacher", task="embedding", data=str(folders / "text.txt"),
                    teacher=str(folders / "teacher"))
    assert same["cosine"] == pytest.approx(1.0) and same["examples"] == 24
    student = evaluate(folders / "student", task="embedding", data=str(folders / "text.txt"),
                       teacher=str(folders / "teacher"))
    assert -1 <= student["min_cosine"] <= student["cosine"] < 0.9999
    with pytest.raises(ReshapeError, match="teacher=None: is needed by --task embedding"):
        evaluate(folders / "student", task="embedding", data=str(folders / "text.txt"))


def cli(*args):
    """`reshape ARGS` in this process (tests/test_cli_smoke.py runs finetune, eval and distill as processes)."""
    return invoke(*args, env={"HF_DATASETS_OFFLINE": "1"})


def test_cli_finetune_then_eval(folders, tmp_path):
    out = tmp_path / "ft"
    done = cli("finetune", folders / "student", "--task", "seq-cls", "--data", folders / "reviews.csv",
               "--label-column", "positive", "-o", out, "--steps", 4, "--batch-size", 16, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 4 and summary["validation"]["step"] == summary["test"]["step"] == 4
    assert summary["validation"]["examples"] == 10 and summary["test"]["examples"] == 24
    scored = cli("eval", out, "--task", "seq-cls", "--data", folders / "reviews.csv", "--label-column", "positive",
                 "--json")
    assert scored.returncode == 0, scored.stderr
    assert set(json.loads(scored.stdout)) == {"accuracy", "f1", "score", "examples", "split"}
    assert json.loads(scored.stdout)["split"] == "test"
    bad = cli("eval", out, "--task", "seq-cls", "--data", folders / "reviews.csv", "--split", "dev")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: split=dev: is not a split; use one of train, " \
        "validation, test"


def test_cli_bad_training_input(folders, tmp_path):
    done = cli("finetune", folders / "student", "--task", "seq-cls", "--data", folders / "reviews.csv",
               "--label-column", "mood", "-o", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: label_column=mood: is not a column of reviews.csv; use one of review, positive")
    assert not (tmp_path / "out").exists()
    done = cli("distill", "--teacher", folders / "teacher", "--student", folders / "student", "--task", "seq-cls",
               "--data", folders / "reviews.csv", "--label-column", "positive", "-o", tmp_path / "out")
    assert done.returncode == 2 and "fine-tune the teacher on this data first" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_cli_distill_and_resume_of_another_run(folders, tmp_path):
    out = tmp_path / "distilled"
    args = ["distill", "--teacher", folders / "teacher", "--student", folders / "student", "--data",
            folders / "text.txt", "-o", out, "--steps", 2, "--batch-size", 8, "--keep-checkpoints", "--quiet"]
    done = cli(*args)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    again = cli(*args[:-2], "--lr", "0.5", "--resume")
    assert again.returncode == 2
    assert "is a checkpoint of a different run" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(folders, tmp_path):
    """The same command under `accelerate launch`: DDP over two CPU processes (gloo)."""
    out = tmp_path / "ddp"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "reshape.cli", "finetune", str(folders / "student"), "--task", "seq-cls",
                           "--data", str(folders / "reviews.csv"), "--label-column", "positive", "-o", str(out),
                           "--steps", "4", "--batch-size", "8", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["processes"] == 2  # printed once, by the first process
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4]  # logged once, not once per process
    assert tf.AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 3
