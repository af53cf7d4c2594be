"""--teacher-cache: the losses read from the cache equal the losses with the teacher in memory (hidden
states to bf16's rounding, logits exactly, a vocabulary's top-k KL within its stated bound), the teacher is
never loaded once the cache exists, a cache written for another run is refused, a sweep writes one cache
for all its points, and resume works on a cached run."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file

from helpers.cli_in_process import invoke

import reshape
import reshape.train.distill as distill_module
import reshape.train.teacher_cache as cache_files
from reshape.errors import ReshapeError
from reshape.train.distill import distill
from reshape.train.losses import DistillWeights, logit_kl, topk_logit_kl
from reshape.train.data import load_data
from reshape.train.loop import TrainConfig
from reshape.train.tasks import TASKS, collator

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
# bf16 keeps 8 significant bits: each cached hidden value is within 2^-9 of the teacher's, and a mean squared
# error against it moves by about as much relatively.
HIDDEN_RTOL = 2**-8
# Near zero (a student in eval mode matches this teacher closely) the squared error moves by the squared
# rounding itself: unit-scale states (after LayerNorm) round by up to 2^-9, squared 2^-18; 2^-16 leaves room.
HIDDEN_ATOL = 2**-16
# Logits are stored in float32, but the teacher ran them in other batches (other padding): float32's noise.
LOGIT_RTOL = 1e-4
CONFIG = TrainConfig(max_steps=3, batch_size=16, log_every=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT masked LM with a real WordPiece tokenizer, a 3-layer student converted from it (layer map
    0,2,3), text of varied length, and the same text labelled with a 2-label teacher for task distillation."""
    root = tmp_path_factory.mktemp("teacher-cache")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=16)
    tf.BertForMaskedLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    reshape.convert(str(root / "teacher"), root / "student", heads=4, depth=3)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(120):
        words = [WORDS[int(i)] for i in torch.randint(0, 6, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                      generator=g)]
        rows.append((" ".join(["the film was very", *words]), int(words[0] in WORDS[:3])))
    (root / "text.txt").write_text("".join(f"{text}\n" for text, _ in rows))
    (root / "reviews.csv").write_text("review,positive\n" + "".join(f"{t},{y}\n" for t, y in rows))
    # A task teacher as `reshape finetune` leaves one: the backbone with a 2-label classifier, saved.
    torch.manual_seed(1)
    classifier = tf.BertForSequenceClassification.from_pretrained(root / "teacher", num_labels=2)
    classifier.save_pretrained(root / "task-teacher")
    tokenizer.save_pretrained(root / "task-teacher")
    return root


def logged(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out):
    return [r for r in logged(out) if "loss" in r]


def validation(out):
    return next(r["validation"] for r in logged(out) if "validation" in r)


def no_teacher(monkeypatch, teacher):
    """Make loading the teacher (by any path distill has) fail the test."""
    load, load_task = distill_module.load_model, distill_module.load_task_model

    def guarded_load(source, *a, **k):
        assert source.folder != teacher, "the teacher was loaded"
        return load(source, *a, **k)

    def guarded_task(path, *a, **k):
        assert str(path) != str(teacher), "the teacher was loaded"
        return load_task(path, *a, **k)

    monkeypatch.setattr(distill_module, "load_model", guarded_load)
    monkeypatch.setattr(distill_module, "load_task_model", guarded_task)


def test_losses_with_the_cache_equal_the_losses_without_it(folders, tmp_path, monkeypatch):
    plain = distill(folders / "teacher", folders / "student", tmp_path / "plain", data=folders / "text.txt",
                    config=CONFIG)
    first = distill(folders / "teacher", folders / "student", tmp_path / "writes", data=folders / "text.txt",
                    config=CONFIG, teacher_cache=tmp_path / "cache")
    no_teacher(monkeypatch, folders / "teacher")
    again = distill(folders / "teacher", folders / "student", tmp_path / "reads", data=folders / "text.txt",
                    config=CONFIG, teacher_cache=tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / cache_files.INDEX).read_text())
    # The embeddings and the mapped layers 0,2,3; a 15-token vocabulary is at most TOP_K: logits whole.
    assert index["needs"]["hidden"] == [0, 1, 3, 4] and index["needs"]["logits"] == "whole"
    assert index["rows"] == {"train": 86, "validation": 10, "test": 24}
    reference = steps(tmp_path / "plain")
    assert len(reference) == 3
    for out in ("writes", "reads"):
        cached = steps(tmp_path / out)
        # Step 1 sees the same student and batch; later steps follow weights trained on the rounded states,
        # so only their total (which the hidden term dominates) is held to bf16's tolerance.
        assert cached[0]["kl"] == pytest.approx(reference[0]["kl"], rel=LOGIT_RTOL)
        assert cached[0]["hidden"] == pytest.approx(reference[0]["hidden"], rel=HIDDEN_RTOL)
        for a, b in zip(cached, reference):
            assert a["loss"] == pytest.approx(b["loss"], rel=HIDDEN_RTOL)
        assert validation(tmp_path / out)["distill_loss"] == pytest.approx(
            validation(tmp_path / "plain")["distill_loss"], rel=HIDDEN_RTOL, abs=HIDDEN_ATOL)
    losses = [[{k: r[k] for k in ("loss", "hidden", "kl")} for r in steps(tmp_path / out)] for out in ("writes", "reads")]
    assert losses[0] == losses[1]  # the same cache, read twice: identical
    assert first["teacher_cache"] == again["teacher_cache"] == str(tmp_path / "cache")
    assert "teacher_cache" not in plain


def test_cached_outputs_are_the_teachers_at_the_real_tokens(folders, tmp_path):
    """Read back for a padded batch: hidden states are the teacher's rounded to bf16, logits exact, padding zero."""
    distill(folders / "teacher", folders / "student", tmp_path / "out", data=folders / "text.txt",
            config=TrainConfig(max_steps=1, batch_size=16), teacher_cache=tmp_path / "cache")
    tokenizer = tf.AutoTokenizer.from_pretrained(folders / "student")
    rows = load_data(str(folders / "text.txt"), task="embedding")["train"]
    batch = collator(tokenizer, TASKS["causal-lm"], 16)([rows[i] for i in range(4)])
    batch.pop("labels")
    index = json.loads((tmp_path / "cache" / cache_files.INDEX).read_text())
    needs = cache_files.Needs(tuple(index["needs"]["hidden"]), "whole")
    cached = cache_files.TeacherCache(tmp_path / "cache", index, needs).outputs(batch)
    teacher = tf.BertForMaskedLM.from_pretrained(folders / "teacher").eval()
    with torch.no_grad():
        real = teacher(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # padding is exercised
    assert cached.hidden_states[2] is None and len(cached.hidden_states) == 5  # layer 1 is mapped by no one
    for j in needs.hidden:
        torch.testing.assert_close(cached.hidden_states[j][mask], real.hidden_states[j][mask], rtol=HIDDEN_RTOL,
                                   atol=1e-6)
        assert not cached.hidden_states[j][~mask].any()
    torch.testing.assert_close(cached.logits[mask], real.logits[mask], rtol=LOGIT_RTOL, atol=1e-5)


def test_topk_kl_falls_short_of_the_full_kl_by_the_tail_mass_times_the_kl_inside_the_tail():
    """The chain rule of KL: full = top-k + p_tail * KL(teacher's tail || student's tail), each renormalised;
    so the top-k KL is a lower bound, exact when the student's tail is shaped as the teacher's, and the
    gap vanishes as k approaches the vocabulary. Zipf-like teacher over 1,000 tokens, student near it."""
    g = torch.Generator().manual_seed(0)
    vocab, temperature = 1000, 2.0
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(2 * 6)]).view(2, 6, vocab) + 1
    teacher = -2.2 * ranks.float().log()  # at T=2, probabilities fall as rank^-1.1
    student = teacher + 0.5 * torch.randn(2, 6, vocab, generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -2:] = 0

    def top(k, logits=teacher):
        values, ids = (logits / temperature).log_softmax(-1).topk(k, dim=-1)
        return values, ids

    full = logit_kl(student, teacher, temperature, mask)
    values, ids = top(64)
    approx = topk_logit_kl(student, values, ids, temperature, mask)
    p, q = (teacher / temperature).log_softmax(-1), (student / temperature).log_softmax(-1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    p_tail, q_tail = p.masked_fill(~tail, -torch.inf), q.masked_fill(~tail, -torch.inf)
    inside = F.kl_div(q_tail.log_softmax(-1), p_tail.log_softmax(-1), log_target=True, reduction="none")
    gap = (p_tail.logsumexp(-1).exp() * inside.nan_to_num().sum(-1))[mask.bool()].mean() * temperature**2
    assert 0 < approx < full
    assert float(full - approx) == pytest.approx(float(gap), rel=1e-3)
    assert topk_logit_kl(student, *top(vocab - 1), temperature, mask) == pytest.approx(float(full), rel=1e-4)
    # The student differs from the teacher only on the top 64: the tail is proportional, the bound is exact.
    shaped = teacher.clone()
    shaped.scatter_add_(-1, ids, torch.randn(ids.shape, generator=g))
    assert topk_logit_kl(shaped, values, ids, temperature, mask) == pytest.approx(
        float(logit_kl(shaped, teacher, temperature, mask)), rel=1e-4)
    # Padded positions, whatever the cache left there, give neither NaN nor gradient.
    student = student.clone().requires_grad_()
    values[1, -2:], ids[1, -2:] = 0.0, 0
    topk_logit_kl(student, values, ids, temperature, mask).backward()
    assert torch.isfinite(student.grad).all() and not student.grad[1, -2:].any()


def test_a_vocabulary_is_cached_as_top_k_and_distils_within_the_bound(folders, tmp_path, monkeypatch):
    """With k below the vocabulary, the KL logged from the cache is the top-k one: at most the full KL."""
    monkeypatch.setattr(cache_files, "TOP_K", 8)
    distill(folders / "teacher", folders / "student", tmp_path / "plain", data=folders / "text.txt", config=CONFIG)
    distill(folders / "teacher", folders / "student", tmp_path / "cached", data=folders / "text.txt",
            config=CONFIG, teacher_cache=tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / cache_files.INDEX).read_text())
    assert (index["needs"]["logits"], index["needs"]["top_k"], index["needs"]["temperature"]) == ("top-k", 8, 2.0)
    chunk = load_file(tmp_path / "cache" / index["chunks"][0])
    assert {name.split("/")[1] for name in chunk} == {"ids", "hidden", "top_values", "top_ids"}
    full, cached = steps(tmp_path / "plain")[0], steps(tmp_path / "cached")[0]
    assert 0 < cached["kl"] <= full["kl"] * (1 + 1e-6)
    assert cached["hidden"] == pytest.approx(full["hidden"], rel=HIDDEN_RTOL)
    # Another temperature changes every cached log-probability: that cache is refused.
    with pytest.raises(ReshapeError, match="holds top-k logits at temperature 2 but this run's KL term needs "
                                           "top-k logits at temperature 1"):
        distill(folders / "teacher", folders / "student", tmp_path / "other", data=folders / "text.txt",
                config=CONFIG, teacher_cache=tmp_path / "cache", temperature=1.0)


def test_task_distillation_reads_the_head_and_the_logits_without_the_teacher(folders, tmp_path, monkeypatch):
    data = dict(data=str(folders / "reviews.csv"), label_column="positive", task="seq-cls")
    plain = distill(folders / "task-teacher", folders / "student", tmp_path / "plain", **data, config=CONFIG)
    distill(folders / "task-teacher", folders / "student", tmp_path / "writes", **data, config=CONFIG,
            teacher_cache=tmp_path / "cache")
    no_teacher(monkeypatch, folders / "task-teacher")
    cached = distill(folders / "task-teacher", folders / "student", tmp_path / "reads", **data, config=CONFIG,
                     teacher_cache=tmp_path / "cache")
    assert cached["head_from_teacher"] == plain["head_from_teacher"] == ["classifier.weight", "classifier.bias"]
    index = json.loads((tmp_path / "cache" / cache_files.INDEX).read_text())
    assert index["needs"]["logits"] == "whole" and index["key"]["task"] == "seq-cls"
    a, b = steps(tmp_path / "plain")[0], steps(tmp_path / "reads")[0]
    assert a["kl"] == pytest.approx(b["kl"], rel=LOGIT_RTOL) and a["task"] == pytest.approx(b["task"], rel=1e-6)
    assert a["hidden"] == pytest.approx(b["hidden"], rel=HIDDEN_RTOL)
    assert cached["test"]["accuracy"] == plain["test"]["accuracy"]


@pytest.mark.parametrize("first,change,message", [
    ({}, dict(max_length=8), r"was written for other max_length \(max_length 16 there, 8 in this run\)"),
    ({}, dict(fewer_rows=True), r"was written for other data \(data [0-9a-f]{16} there, [0-9a-f]{16} in this run\)"),
    ({}, dict(explicit_map=[1, 2, 3]), r"holds hidden states 0,1,3,4 but this run's layer map and loss weights "
                                       r"need 0,2,3,4"),
    (dict(weights=DistillWeights(kl=0)), {}, r"holds no logits but this run's KL term needs whole logits"),
    ({}, dict(touch_teacher=True), r"was written for other teacher config or weights \(teacher [0-9a-f]{16} there"),
], ids=["max-length", "data", "layer-map", "kl-not-cached", "teacher-weights"])
def test_a_cache_written_for_another_run_is_refused_in_one_line(folders, tmp_path, first, change, message):
    cache = tmp_path / "cache"
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for file in (folders / "teacher").iterdir():  # a copy of our own, whose weights the test may rewrite
        (teacher / file.name).write_bytes(file.read_bytes())
    distill(teacher, folders / "student", tmp_path / "first", data=folders / "text.txt",
            config=TrainConfig(max_steps=1, batch_size=16), teacher_cache=cache, **first)
    change = dict(change)
    if change.pop("touch_teacher", False):
        weights = teacher / "model.safetensors"
        weights.write_bytes(weights.read_bytes())  # rewritten: its time changes, so the cache cannot vouch for it
    if change.pop("fewer_rows", False):
        (tmp_path / "fewer.txt").write_text("".join((folders / "text.txt").read_text().splitlines(True)[:100]))
        change["data"] = tmp_path / "fewer.txt"
    kwargs = dict(data=folders / "text.txt", config=TrainConfig(max_steps=1, batch_size=16), teacher_cache=cache)
    with pytest.raises(ReshapeError) as refused:
        distill(teacher, folders / "student", tmp_path / "second", **{**kwargs, **change})
    text = str(refused.value)
    assert "\n" not in text and text.startswith(f"teacher_cache={cache}: ")
    assert text.endswith(f"use another --teacher-cache folder (this run then writes it), or delete {cache} to "
                         "rebuild it")
    assert re.search(message, text.split("; use another")[0]), text
    assert not (tmp_path / "second").exists()  # refused before OUT was made


def test_refusals_before_any_work(folders, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("the user's")
    with pytest.raises(ReshapeError, match=r"teacher_cache=.*busy: is not empty and holds no teacher cache"):
        distill(folders / "teacher", folders / "student", tmp_path / "out", data=folders / "text.txt",
                config=TrainConfig(max_steps=1, batch_size=16), teacher_cache=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "the user's"
    with pytest.raises(ReshapeError, match=r"teacher_cache=.*cache: cannot serve the attention-relation term.*"
                                           r"drop --teacher-cache, or set --relation 0"):
        distill(folders / "teacher", folders / "student", tmp_path / "out", data=folders / "text.txt",
                weights=DistillWeights(relation=1), teacher_cache=tmp_path / "cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_cli_refuses_a_stale_cache_with_exit_2(folders, tmp_path):
    distill(folders / "teacher", folders / "student", tmp_path / "first", data=folders / "text.txt",
            config=TrainConfig(max_steps=1, batch_size=16), teacher_cache=tmp_path / "cache")
    done = invoke("distill", "--teacher", folders / "teacher", "--student", folders / "student", "--data",
                  folders / "text.txt", "-o", tmp_path / "out", "--steps", "1", "--max-length", "8",
                  "--teacher-cache", tmp_path / "cache")
    assert done.code == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: teacher_cache={tmp_path / 'cache'}: was written for other max_length (max_length 16 there, 8 in "
        f"this run); use another --teacher-cache folder (this run then writes it), or delete {tmp_path / 'cache'} "
        "to rebuild it")
    assert not (tmp_path / "out").exists()


def test_resume_with_the_cache_gives_the_uninterrupted_weights(folders, tmp_path, monkeypatch):
    config = TrainConfig(max_steps=5, batch_size=16, save_every=2, log_every=1)
    args = dict(data=folders / "text.txt", config=config, teacher_cache=tmp_path / "cache")
    distill(folders / "teacher", folders / "student", tmp_path / "straight", **args)

    class Interrupt(Exception):
        pass

    calls, read = [], cache_files.TeacherCache.outputs

    def interrupted_at_4(self, batch):
        calls.append(1)
        if len(calls) == 4:  # in the middle of step 4; the last checkpoint is at step 2
            raise Interrupt
        return read(self, batch)

    monkeypatch.setattr(cache_files.TeacherCache, "outputs", interrupted_at_4)
    with pytest.raises(Interrupt):
        distill(folders / "teacher", folders / "student", tmp_path / "resumed", **args)
    monkeypatch.setattr(cache_files.TeacherCache, "outputs", read)
    state = json.loads((tmp_path / "resumed/checkpoints/last/reshape_train_state.json").read_text())
    assert state["step"] == 2
    no_teacher(monkeypatch, folders / "teacher")
    result = distill(folders / "teacher", folders / "student", tmp_path / "resumed", resume=True, **args)
    assert result["steps"] == 5
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_sweep_writes_one_cache_and_every_point_reads_it(folders, tmp_path, monkeypatch):
    from reshape.sweep import sweep

    writes, teacher_loads = [], []
    write, load = cache_files.write, distill_module.load_model
    monkeypatch.setattr(cache_files, "write", lambda *a, **k: (writes.append(1), write(*a, **k))[1])
    monkeypatch.setattr(distill_module, "load_model", lambda source, *a, **k: (
        teacher_loads.append(source.folder) if source.folder == folders / "teacher" else None, load(source, *a, **k))[1])
    (tmp_path / "labelled.csv").write_text((folders / "reviews.csv").read_text().replace("review,positive",
                                                                                          "text,label"))
    results = sweep(str(folders / "teacher"), tmp_path / "sweep", heads=[2], depths=[2, 3], task="seq-cls",
                    data=str(tmp_path / "labelled.csv"), distill_data=str(folders / "text.txt"), budget=1,
                    batch_size=16, teacher_cache=tmp_path / "cache")
    assert [r["point"] for r in results["rows"]] == ["source", "3x2", "2x2"]
    # Two points distil, mapping 0,2,3 (depth 3) and 0,3 (depth 2): the first writes every layer, once.
    assert writes == [1] and len(teacher_loads) == 1
    index = json.loads((tmp_path / "cache" / cache_files.INDEX).read_text())
    assert index["needs"]["hidden"] == [0, 1, 2, 3, 4]


def test_a_sweep_refuses_a_cache_it_would_not_use(folders, tmp_path):
    from reshape.sweep import sweep

    with pytest.raises(ReshapeError, match=r"teacher_cache=.*: is unused: only a sweep that distils"):
        sweep(str(folders / "teacher"), tmp_path / "sweep", heads=[4], depths=[2], task="seq-cls",
              data=str(folders / "reviews.csv"), budget=1, teacher_cache=tmp_path / "cache")
    assert not (tmp_path / "sweep").exists()

