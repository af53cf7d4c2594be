"""The training loop: exact resume, checkpoints, metrics log, refusing another run's checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from reshape.errors import ReshapeError
from reshape.train.loop import EpochSeededLengthGroupedSampler, Interrupted, TrainConfig, train

X = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
Y = (X.sum(1) > 0).long()
DATA = [{"x": X[i], "y": Y[i]} for i in range(40)]


def collate(items):
    return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}


def model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))  # dropout uses the RNG


def loss_fn(m, batch):
    return nn.functional.cross_entropy(m(batch["x"]), batch["y"]), {}


def accuracy(m):
    acc = (m(X).argmax(1) == Y).float().mean().item()
    return {"score": acc, "accuracy": acc}


class Interrupt(Exception):
    pass


def interrupted_at(call: int):
    calls = []

    def fn(m, batch):
        calls.append(1)
        if len(calls) == call:
            raise Interrupt  # as Ctrl-C would, in the middle of an epoch
        return loss_fn(m, batch)

    return fn


LENGTHS = [int(v) for v in torch.randint(1, 100, (40,), generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("grad_accum, lengths", [(1, None), (2, None), (1, LENGTHS)], ids=["plain", "accum", "grouped"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, grad_accum, lengths):
    config = TrainConfig(max_steps=9, batch_size=6, lr=1e-2, grad_accum=grad_accum, save_every=2, log_every=1)
    straight = model()
    train(straight, loss_fn, DATA, collate, tmp_path / "a", config, lengths=lengths, progress=False)

    # Interrupted mid-epoch (7 batches an epoch); the last checkpoint, at step 6, is behind the interruption.
    with pytest.raises(Interrupt):
        train(model(), interrupted_at(8 if grad_accum == 1 else 12), DATA, collate, tmp_path / "b", config,
              lengths=lengths, progress=False)
    state = json.loads((tmp_path / "b/checkpoints/last/reshape_train_state.json").read_text())
    assert state["step"] == 6
    resumed = model()  # as in a fresh process
    summary = train(resumed, loss_fn, DATA, collate, tmp_path / "b", config, resume=True, lengths=lengths,
                    progress=False)
    assert summary["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    train(model(), loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=2, batch_size=8), progress=False)
    with pytest.raises(ReshapeError, match="resume=.*last: is a checkpoint of a different run"):
        train(model(), loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=2, batch_size=8, lr=1.0),
              resume=True, progress=False)
    with pytest.raises(ReshapeError, match="has no checkpoint to resume from"):
        train(model(), loss_fn, DATA, collate, tmp_path / "new", TrainConfig(max_steps=2), resume=True, progress=False)


def test_evaluation_best_checkpoint_and_metrics_log(tmp_path):
    m = model()
    tested = []

    def test_fn(net):  # scored once, after the best weights are back
        tested.append(accuracy(net)["score"])
        return {"score": tested[-1]}

    summary = train(m, loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=6, batch_size=8, lr=5e-2,
                    eval_every=2, log_every=3), eval_fn=accuracy, test_fn=test_fn, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 6]
    evals = [r for r in records if "validation" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = max(evals, key=lambda r: r["validation"]["score"])
    assert summary["validation"]["step"] == best["step"]
    assert summary["validation"]["score"] == best["validation"]["score"]
    assert accuracy(m.eval())["score"] == best["validation"]["score"]  # the best weights are loaded back
    assert tested == [best["validation"]["score"]] and summary["test"] == {"score": tested[0], "step": best["step"]}
    assert [r for r in records if "test" in r] == [{"step": 6, "test": summary["test"]}]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "last"]


def test_length_grouped_batches_are_transformers_order_drawn_from_seed_and_epoch():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [int(v) for v in torch.randint(1, 1000, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = EpochSeededLengthGroupedSampler(lengths, batch_size=16, seed=0)
    first = list(sampler)
    assert first == get_length_grouped_indices(lengths, 16, generator=torch.Generator().manual_seed(0))
    assert sorted(first) == list(range(1000))
    assert first == list(sampler) == list(EpochSeededLengthGroupedSampler(lengths, 16, seed=0))  # as after a resume
    assert list(EpochSeededLengthGroupedSampler(lengths, 16, seed=1)) != first
    sampler.set_epoch(1)
    assert list(sampler) == get_length_grouped_indices(lengths, 16, generator=torch.Generator().manual_seed(1))
    assert list(sampler) != first
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(first, 16)]
    random_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(list(range(1000)), 16)]
    assert sum(spread) * 5 < sum(random_spread)  # batches pad far less than random ones
    assert lengths[first[0]] == max(lengths)  # the longest batch comes first: out of memory at once, if at all


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_learning_rate_warms_up_from_zero_then_decays_linearly_to_the_last_step(tmp_path, grad_accum):
    # transformers' get_linear_schedule_with_warmup: 20 steps, 5 of warm-up; the rate each optimizer step used
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        train(model(), loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=20, batch_size=4, lr=1e-2,
              warmup_ratio=0.25, grad_accum=grad_accum), progress=False)
    finally:
        hook.remove()
    assert len(used) == 20  # one scheduler step per optimizer step, not per accumulated batch
    assert used[0] == 0.0 and used[1] == pytest.approx(2e-3) and used[5] == pytest.approx(1e-2)  # peak at step 5
    assert used == pytest.approx([1e-2 * s / 5 for s in range(5)] + [1e-2 * (20 - s) / 15 for s in range(5, 20)])
    assert used[-1] == pytest.approx(1e-2 / 15)  # the rate reaches 0 after the last step, not at it


def test_min_steps_gives_small_data_whole_extra_epochs(tmp_path):
    # 40 examples in batches of 8: 5 steps an epoch; at least 12 steps means 3 whole epochs.
    summary = train(model(), loss_fn, DATA, collate, tmp_path, TrainConfig(batch_size=8, min_steps=12),
                    progress=False)
    assert summary["steps"] == 15 and not summary["stopped_early"]
    summary = train(model(), loss_fn, DATA, collate, tmp_path / "b", TrainConfig(batch_size=8, min_steps=12,
                    max_steps=4), progress=False)
    assert summary["steps"] == 4  # an explicit step budget wins


def test_patience_stops_when_validation_stops_improving_and_keeps_the_best(tmp_path):
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.95])  # best at the 2nd evaluation, then two worse ones

    def validation(m):
        return {"score": next(scores)}

    m = model()
    summary = train(m, loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=20, batch_size=8, eval_every=2,
                    patience=2), eval_fn=validation, progress=False)
    assert summary["steps"] == 8 and summary["stopped_early"]  # evaluations at 2, 4 (best), 6, 8: stop
    assert summary["validation"]["step"] == 4 and summary["validation"]["score"] == 0.9
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "early_stop" in r] == [8]


def test_patience_without_eval_every_evaluates_every_twentieth_of_the_budget(tmp_path):
    calls = []

    def validation(m):
        calls.append(1)
        return {"score": 1.0}  # never improves after the first: stops after `patience` more

    summary = train(model(), loss_fn, DATA, collate, tmp_path, TrainConfig(max_steps=400, batch_size=8,
                    patience=3), eval_fn=validation, progress=False)
    assert summary["steps"] == 80 and len(calls) == 4  # every 20 steps: 20 (best), 40, 60, 80 -> stop


def test_last_is_written_at_every_evaluation(tmp_path):
    config = TrainConfig(max_steps=9, batch_size=6, lr=1e-2, eval_every=3)  # save_every (100) never comes
    straight = model()
    train(straight, loss_fn, DATA, collate, tmp_path / "a", config, eval_fn=accuracy, progress=False)
    with pytest.raises(Interrupt):
        train(model(), interrupted_at(8), DATA, collate, tmp_path / "b", config, eval_fn=accuracy, progress=False)
    state = json.loads((tmp_path / "b/checkpoints/last/reshape_train_state.json").read_text())
    assert state["step"] == 6  # the evaluation at step 6
    resumed = model()  # saving more often is the same run: its checkpoint is accepted
    summary = train(resumed, loss_fn, DATA, collate, tmp_path / "b", replace(config, save_every=1),
                    eval_fn=accuracy, resume=True, progress=False)
    assert summary["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("window", ["between-the-renames", "before-the-cleanup"])
def test_a_kill_during_a_checkpoint_swap_leaves_a_usable_last(tmp_path, window):
    config = TrainConfig(max_steps=9, batch_size=6, lr=1e-2, save_every=2)
    straight = model()
    train(straight, loss_fn, DATA, collate, tmp_path / "a", config, progress=False)
    with pytest.raises(Interrupt):
        train(model(), interrupted_at(8), DATA, collate, tmp_path / "b", config, progress=False)
    checkpoints = tmp_path / "b/checkpoints"  # last: step 6
    if window == "between-the-renames":  # the old last moved aside, the new one not yet in place
        (checkpoints / "last").rename(checkpoints / ".last.old")
        (checkpoints / ".last.tmp").mkdir()
    else:  # the new last in place, the old one not yet removed
        (checkpoints / ".last.old").mkdir()
        (checkpoints / ".last.old" / "model.safetensors").write_bytes(b"stale")
    resumed = model()
    summary = train(resumed, loss_fn, DATA, collate, tmp_path / "b", config, resume=True, progress=False)
    assert summary["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]


def test_sigterm_saves_last_at_the_next_step_and_says_how_to_resume(tmp_path, capfd):
    config = TrainConfig(max_steps=9, batch_size=6, lr=1e-2)  # save_every (100) never comes
    straight = model()
    train(straight, loss_fn, DATA, collate, tmp_path / "a", config, progress=False)

    calls = []

    def terminated_at_5(m, batch):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # `kill PID` in the middle of step 5
        return loss_fn(m, batch)

    class Terminated(Exception):
        pass

    def default(signum, frame):  # stands in for SIGTERM's default, which would end pytest
        raise Terminated

    before = signal.signal(signal.SIGTERM, default)
    try:
        with pytest.raises(Interrupted) as stopped:
            train(model(), terminated_at_5, DATA, collate, tmp_path / "b", config, progress=False)
        assert signal.getsignal(signal.SIGTERM) is default  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, before)
    last = tmp_path / "b/checkpoints/last"
    assert stopped.value.step == 5 and json.loads((last / "reshape_train_state.json").read_text())["step"] == 5
    err = capfd.readouterr().err
    assert f"Stopped by SIGTERM at step 5; saved {last}. To continue, run the same command with --resume" in err

    resumed = model()
    summary = train(resumed, loss_fn, DATA, collate, tmp_path / "b", config, resume=True, progress=False)
    assert summary["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    calls = []

    def interrupted_twice(m, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(m, batch)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(model(), interrupted_twice, DATA, collate, tmp_path, TrainConfig(max_steps=9, batch_size=6),
              progress=False)
    assert not isinstance(stopped.value, Interrupted) and len(calls) == 3
    assert not (tmp_path / "checkpoints" / "last").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_save_every_is_refused_below_one(tiny_task, tmp_path):
    from typer.testing import CliRunner

    from reshape.cli import app

    with pytest.raises(ReshapeError, match=r"^save_every=0: must be at least 1; "):
        TrainConfig(save_every=0)
    folder, data = tiny_task
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["finetune", str(folder), "--task", "seq-cls", "--data", str(data),
                                    "--label-column", "positive", "-o", str(out), "--steps", "4", "--save-every", "0"])
    assert done.exit_code == 2, done.output
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == [
        line for line in done.stderr.splitlines() if line.strip()]
    assert done.stderr.startswith("error: save_every=0: must be at least 1; ") and not out.exists()


# --- a real process, killed -----------------------------------------------------------------------

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
# One torch thread in every run compared: thread counts change the float sums, and on a busy 2-core
# machine two spinning OpenMP threads made a step of this tiny model take seconds instead of milliseconds.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
       "OMP_NUM_THREADS": "1"}
STEP_SLEEP = 0.05  # seconds added to each optimizer step of the run that is killed, so a kill lands mid-run


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A tiny BERT with a WordPiece tokenizer, and a CSV whose label is whether a review uses a positive word."""
    import transformers as tf

    root = tmp_path_factory.mktemp("loop")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "the", "film", "was", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=16))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    g = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(0, 6, (120,), generator=g)]
    rows = [f"the film was very {word},{int(word in WORDS[:3])}" for word in words]
    (root / "reviews.csv").write_text("review,positive\n" + "\n".join(rows) + "\n")
    return root / "bert", root / "reviews.csv"


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_finishes_with_the_uninterrupted_weights(tiny_task, tmp_path):
    from safetensors.torch import load_file

    from reshape.train.finetune import finetune

    folder, data = tiny_task
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "reshape.cli", "finetune", str(folder), "--task", "seq-cls", "--data", str(data),
            "--label-column", "positive", "-o", str(out), "--steps", "40", "--eval-every", "10", "--batch-size", "16",
            "--lr", "3e-3", "--max-length", "16", "--quiet"]
    # A sitecustomize on the path slows every optimizer step of the killed run alone (the maths is unchanged).
    hook = tmp_path / "slow"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nfrom torch.optim.optimizer import register_optimizer_step_post_hook\n"
        f"register_optimizer_step_post_hook(lambda *a: time.sleep({STEP_SLEEP}))\n")
    with (tmp_path / "killed.err").open("w") as err:
        run = subprocess.Popen(args, env={**ENV, "PYTHONPATH": str(hook)}, stdout=subprocess.DEVNULL, stderr=err)
        try:
            saved, deadline = None, time.monotonic() + 240
            while saved is None:  # the first `last`: at the evaluation at step 10
                assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()
                try:
                    saved = json.loads((out / "checkpoints/last/reshape_train_state.json").read_text())["step"]
                except (OSError, ValueError):
                    time.sleep(0.01)
            assert saved < 40, "no checkpoint before the end of the run"
            target = random.randint(saved + 1, 32)  # a random step, some before the end
            time.sleep((target - saved) * STEP_SLEEP)
        finally:
            run.kill()  # SIGKILL: no handler runs
            run.wait()
    assert not (out / "finetune.json").exists(), f"the run finished before the kill at step ~{target}"

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "finetune.json").read_text())["steps"] == 40

    straight = tmp_path / "straight"  # the same run, uninterrupted (the same settings the CLI builds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(folder, straight, task="seq-cls", data=str(data), label_column="positive", max_length=16,
                 config=TrainConfig(max_steps=40, eval_every=10, batch_size=16, lr=3e-3))
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a kill at step ~{target}"


# --- masked-LM batches: transformers' collator, on the RNG the loop seeds and saves ----------------

def test_masked_lm_batches_mask_15_percent_of_real_tokens_80_10_10():
    import transformers as tf

    from reshape.train.tasks import TASKS, collator

    words = [f"w{i}" for i in range(2000)]  # a large vocabulary: a random replacement is rarely the original
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(specials + words)})
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(words[int(j)] for j in torch.randint(0, 2000, (int(n),), generator=g))}
            for n in torch.randint(1, 40, (2000,), generator=g)]  # ragged: padding, and some truncation
    collate = collator(tokenizer, TASKS["masked-lm"], 32)
    torch.manual_seed(0)
    batch = collate(rows)
    torch.manual_seed(0)
    again = collate(rows)
    assert batch.keys() == again.keys() and all(torch.equal(v, again[k]) for k, v in batch.items())
    assert not torch.equal(batch["input_ids"], collate(rows)["input_ids"])  # the global RNG decides

    plain = tokenizer([r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    ids, labels, original = batch["input_ids"], batch["labels"], plain["input_ids"]
    assert torch.equal(batch["attention_mask"], plain["attention_mask"])
    masked = labels != -100
    real = plain["attention_mask"].bool() & (original != 2) & (original != 3)  # neither [CLS], [SEP] nor padding
    assert not (masked & ~real).any() and torch.equal(ids[~masked], original[~masked])  # the rest untouched
    assert torch.equal(labels[masked], original[masked])  # the loss scores the original tokens
    assert masked.sum() / real.sum() == pytest.approx(0.15, abs=0.01)  # ~37,600 real tokens: 0.0018 a sigma
    became = ids[masked]  # ~5,600 masked: 0.005 a sigma at 0.8
    assert (became == 4).float().mean() == pytest.approx(0.8, abs=0.03)  # [MASK]
    assert (became == labels[masked]).float().mean() == pytest.approx(0.1, abs=0.03)  # kept
    assert ((became != 4) & (became != labels[masked])).float().mean() == pytest.approx(0.1, abs=0.03)  # random


def test_masked_lm_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_task, tmp_path):
    import transformers as tf

    from reshape.train.tasks import TASKS, collator

    folder, _ = tiny_task
    collate = collator(tf.AutoTokenizer.from_pretrained(folder), TASKS["masked-lm"], 16)
    rows = [{"text": f"the film was very {w}"} for w in WORDS * 5]

    def mlm_loss(m, batch):
        return m(**batch).loss, {}

    def bert():
        return tf.BertForMaskedLM.from_pretrained(folder)

    config = TrainConfig(max_steps=9, batch_size=6, lr=1e-2, save_every=2)
    straight = bert()
    train(straight, mlm_loss, rows, collate, tmp_path / "a", config, progress=False)
    calls = []

    def interrupted(m, batch):
        calls.append(1)
        if len(calls) == 8:
            raise Interrupt
        return mlm_loss(m, batch)

    with pytest.raises(Interrupt):
        train(bert(), interrupted, rows, collate, tmp_path / "b", config, progress=False)
    resumed = bert()  # from step 6: the masks of steps 7 to 9 come from the restored RNG state
    assert train(resumed, mlm_loss, rows, collate, tmp_path / "b", config, resume=True, progress=False)["steps"] == 9
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
