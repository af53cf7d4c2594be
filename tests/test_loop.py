"""The training loop: exact resume, checkpoints, metrics log, refusing another run's checkpoint."""

import json

import pytest
import torch
from torch import nn

from reshape.errors import ReshapeError
from reshape.train.loop import LengthGroupedSampler, TrainConfig, train

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


def test_length_grouped_batches_are_a_seeded_shuffle_of_similar_lengths():
    lengths = [int(v) for v in torch.randint(1, 1000, (1000,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=0, group=10)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(first, 16)]
    random_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(list(range(1000)), 16)]
    assert sum(spread) * 5 < sum(random_spread)  # batches pad far less than random ones
    assert len(_batches(first, 16)[-1]) == 1000 % 16 and first[-8:] == sorted(first[-8:], key=lambda i: -lengths[i])


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


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
