"""--select importance: Block Influence scores on calibration text pick the layers to keep."""

import pytest
import torch
import transformers as tf

import reshape
from reshape.errors import ReshapeError
from reshape.importance import layer_scores, most_important

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "play", "is", "a", "king", "ghost", "night"]


@pytest.fixture
def llama_folder(tmp_path):
    """A tiny pre-norm decoder whose layer 2 adds nothing to the residual stream (its output = its input)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=48, vocab_size=len(WORDS)))
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n".join(["the play is a ghost", "the king is a night ghost"] * 10))
    return folder


def test_a_block_that_changes_nothing_scores_zero_and_goes_first(llama_folder):
    model = tf.AutoModelForCausalLM.from_pretrained(llama_folder)
    batches = [{"input_ids": torch.tensor([[5, 6, 7, 8, 10], [5, 9, 7, 8, 11]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}]
    scores = layer_scores(model, model.model.layers, batches)
    assert scores[2] < 1e-4 and all(s > 1e-2 for i, s in enumerate(scores) if i != 2), scores  # float rounding
    assert most_important(scores, 3) == (0, 1, 3)
    angular = layer_scores(model, model.model.layers, batches, metric="angular")
    assert angular[2] < 1e-2 and most_important(angular, 3) == (0, 1, 3), angular


def test_convert_keeps_the_most_important_layers_and_reports_the_scores(llama_folder, tmp_path):
    recipe = reshape.convert(str(llama_folder), tmp_path / "out", heads=4, depth=3, select="importance",
                             calib=str(tmp_path / "calib.txt"))
    assert recipe["plan"]["keep"] == [0, 1, 3]
    scores = recipe["layer_scores"]
    assert scores["metric"] == "block-influence" and len(scores["scores"]) == 4 and scores["scores"][2] < 1e-4


def test_importance_without_calibration_text_scores_random_tokens(llama_folder, tmp_path):
    recipe = reshape.convert(str(llama_folder), tmp_path / "out", heads=4, depth=3, select="importance")
    assert recipe["layer_scores"]["calib"] == "random tokens" and recipe["plan"]["keep"] == [0, 1, 3]
    with pytest.raises(ReshapeError) as e:  # plan problems are still reported before any work
        reshape.convert(str(llama_folder), tmp_path / "bad", heads=7, depth=3, select="importance")
    assert [str(p).split(":")[0] for p in e.value.problems] == ["heads=7"]
    assert not (tmp_path / "bad").exists()


def test_decoders_pick_layers_by_importance_by_default_and_encoders_spread_evenly():
    import torch

    import reshape
    from reshape.importance import layer_scores, most_important
    from reshape.inputs import random_inputs
    from reshape.pipeline import default_select
    from reshape.source import spec_of
    from reshape.testing import tiny_config, tiny_model

    for model_type, kind in (("llama", "importance"), ("qwen3", "importance"), ("gpt2", "importance"),
                             ("bert", "uniform"), ("t5", "uniform"), ("vit", "uniform")):
        spec = spec_of(tiny_config(model_type))
        assert default_select(spec.family, spec.config) == kind, model_type
    model = tiny_model("llama")
    with torch.no_grad():
        scores = layer_scores(model, model.layers, random_inputs(model))
    new = reshape.leaner(model, depth=4)  # no --select: Block Influence on random tokens
    kept = most_important(scores, 4)
    assert kept != (0, 2, 3, 5)  # not the even spread, for this model
    for new_index, old_index in enumerate(kept):
        assert torch.equal(new.layers[new_index].mlp.up_proj.weight, model.layers[old_index].mlp.up_proj.weight)
    even = reshape.leaner(model, depth=4, select="uniform")  # asked for: honoured
    assert torch.equal(even.layers[1].mlp.up_proj.weight, model.layers[2].mlp.up_proj.weight)
