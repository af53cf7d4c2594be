"""Training data: the offline recipes, local files and folders, the train/test split, and every error."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reshape.errors import ReshapeError
from reshape.train.data import FASHION_MNIST, RECIPES, load_data

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                                         reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh)")


@pytest.fixture(autouse=True)
def offline_private_cache(tmp_path, monkeypatch):
    """datasets' cache of local files goes under tmp_path, and the Hub is unreachable at once."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def counts(data) -> dict:
    return {split: dict(sorted(collections.Counter(part["label"]).items())) for split, part in data.items()}


def all_texts(data) -> list[str]:
    return list(data["train"]["text"]) + list(data["validation"]["text"]) + list(data["test"]["text"])


def message(call) -> str:
    with pytest.raises(ReshapeError) as e:
        call()
    assert len(e.value.problems) == 1 and "\n" not in str(e.value)
    return str(e.value)


# --- recipes -------------------------------------------------------------------------------------------


def test_rotten_tomatoes_has_fixed_stratified_validation_and_test_splits():
    data = load_data("rotten-tomatoes", task="seq-cls")
    assert list(data) == ["train", "validation", "test"] and data["train"].column_names == ["text", "label"]
    assert data["train"].features["label"].names == ["rotten", "fresh"]
    # 4,866 fresh/rotten reviews less 3 duplicated texts; 20% held out for test (the split of every earlier
    # default run), then 10% of the rest for validation, the same share of each class.
    assert counts(data) == {"train": {0: 1735, 1: 1766}, "validation": {0: 193, 1: 196}, "test": {0: 482, 1: 491}}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not set(data[a]["text"]) & set(data[b]["text"])
    again = load_data("rotten-tomatoes", task="seq-cls")  # no seed moves them
    assert data["test"]["text"] == again["test"]["text"] and data["validation"]["text"] == again["validation"]["text"]


def test_rotten_tomatoes_for_text_tasks_keeps_only_the_text():
    data = load_data("rotten-tomatoes", task="masked-lm")
    assert data["train"].column_names == ["text"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (3501, 389, 973)


def test_rotten_tomatoes_full_never_contains_a_held_out_text():
    small = load_data("rotten-tomatoes", task="seq-cls")
    full = load_data("rotten-tomatoes-full", task="seq-cls")
    assert counts(full) == {"train": {0: 4709, 1: 6681}, "validation": {0: 193, 1: 196}, "test": {0: 482, 1: 491}}
    for split in ("validation", "test"):  # the same held-out sets, so scores compare
        assert full[split]["text"] == small[split]["text"]
        assert not set(full["train"]["text"]) & set(small[split]["text"])
    assert set(small["train"]["text"]) <= set(full["train"]["text"])


def test_hamlet_holds_out_the_end_of_the_play():
    data = load_data("hamlet", task="causal-lm")
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (269, 34, 34)
    assert data["train"].column_names == ["text"]
    play = "\n".join(all_texts(data))
    assert play.startswith("ACT I\nSCENE I. Elsinore.")
    assert list(data["test"]["text"])[-1].endswith("a peal of ordnance is shot off")
    assert list(data["test"]["text"])[0].startswith("How was this seal'd?")  # Act V, Scene II
    # Validation is the stretch just before it: unseen text too, never mixed with the test text.
    assert data["validation"]["text"][-1] + "\n" + data["test"]["text"][0] in play
    assert all(len(t.splitlines()) == 16 for t in data["train"]["text"])


@needs_fashion_mnist
def test_fashion_mnist_is_the_standard_split():
    data = load_data("fashion-mnist", task="image-cls")
    assert counts(data) == {"train": dict.fromkeys(range(10), 5400), "validation": dict.fromkeys(range(10), 600),
                            "test": dict.fromkeys(range(10), 1000)}
    assert data["train"].features["label"].names[:2] == ["T-shirt/top", "Trouser"]
    from reshape.train.data import _idx_images

    first = _idx_images("train")[0]  # the raw file's first image (validation is carved from these rows)
    assert first["label"] == 9 and first["image"].mode == "L"  # the famous first image: an ankle boot
    pixels = np.asarray(first["image"])
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert int(pixels.sum()) == 76_247  # the sum of bytes 16-800 of the raw file


@pytest.mark.parametrize("recipe,task", [("hamlet", "image-cls"), ("hamlet", "seq-cls"), ("fashion-mnist", "causal-lm"),
                                         ("rotten-tomatoes", "image-cls")])
def test_a_task_that_does_not_fit_the_recipe_is_refused(recipe, task):
    text = message(lambda: load_data(recipe, task=task))
    assert text.startswith(f"task={task}: does not fit the recipe {recipe}")
    assert ", ".join(RECIPES[recipe].tasks) in text


def test_recipes_refuse_columns_and_splits():
    assert message(lambda: load_data("hamlet", task="causal-lm", text_column="line")).startswith(
        "text_column=line: does not apply to the recipe hamlet")
    assert message(lambda: load_data("rotten-tomatoes", task="seq-cls", split="train")).startswith("split=train:")


# --- local files and folders -------------------------------------------------------------------------------


REVIEWS = pd.DataFrame({"id": range(20), "review": [f"review number {i}" for i in range(20)],
                        "category": ["good", "bad", "good", "meh"] * 5})


@pytest.mark.parametrize("name,write", [
    ("reviews.csv", lambda frame, path: frame.to_csv(path, index=False)),
    ("reviews.jsonl", lambda frame, path: frame.to_json(path, orient="records", lines=True)),
    ("reviews.json", lambda frame, path: frame.to_json(path, orient="records")),
    ("reviews.parquet", lambda frame, path: frame.to_parquet(path)),
])
def test_local_files_guess_the_columns_and_encode_string_labels(tmp_path, name, write):
    write(REVIEWS, tmp_path / name)
    data = load_data(str(tmp_path / name), task="seq-cls")
    assert list(data) == ["train", "validation", "test"] and data["train"].column_names == ["text", "label"]
    assert data["train"].features["label"].names == ["bad", "good", "meh"]  # sorted
    # Stratified: 20% for test, then 10% of the other 16 (2 rows, by largest remainder) for validation.
    assert counts(data) == {"train": {0: 3, 1: 7, 2: 4}, "validation": {0: 1, 1: 1}, "test": {0: 1, 1: 2, 2: 1}}
    labels = dict(zip(REVIEWS.review, REVIEWS.category))
    names = data["test"].features["label"].names
    assert all(labels[row["text"]] == names[row["label"]] for row in data["test"])


def test_named_columns_and_integer_labels_keep_their_ids(tmp_path):
    frame = pd.DataFrame({"body": [f"text {i}" for i in range(10)], "stars": [0, 4] * 5, "text": ["x"] * 10})
    frame.to_csv(tmp_path / "stars.csv", index=False)
    data = load_data(str(tmp_path / "stars.csv"), task="seq-cls", text_column="body", label_column="stars")
    assert data["train"].features["label"].num_classes == 5 and set(data["train"]["label"]) == {0, 4}
    assert all(t.startswith("text ") for t in all_texts(data))


def test_missing_and_unlabelled_rows_are_dropped(tmp_path):
    frame = pd.DataFrame({"sentence": ["a", "", "c", "d", "e", "f", "  ", "h", "i", "j"],
                          "label": [0, 1, -1, 1, 0, 1, 0, None, 1, 0]})
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    data = load_data(str(tmp_path / "gaps.csv"), task="seq-cls", test_ratio=0.34, validation_ratio=0.5)
    kept = sorted(all_texts(data))
    assert kept == ["a", "d", "e", "f", "i", "j"] and data["train"].features["label"].num_classes == 2


def test_text_files_give_one_example_per_non_empty_line(tmp_path):
    (tmp_path / "lines.txt").write_text("first\n\nsecond\n   \nthird\nfourth\nfifth\n")
    data = load_data(str(tmp_path / "lines.txt"), task="causal-lm", validation_ratio=0.25)
    assert sorted(all_texts(data)) == ["fifth", "first", "fourth", "second", "third"]
    assert (len(data["train"]), len(data["validation"]), len(data["test"])) == (3, 1, 1)


def test_a_folder_with_train_and_test_files_keeps_its_split(tmp_path):
    REVIEWS[:15].to_csv(tmp_path / "train.csv", index=False)
    REVIEWS[15:].to_csv(tmp_path / "test.csv", index=False)
    data = load_data(str(tmp_path), task="embedding")
    assert data["test"]["text"] == list(REVIEWS.review[15:])
    assert len(data["train"]) + len(data["validation"]) == 15 and len(data["validation"]) == 2  # carved from train


def write_images(folder: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4, 3), 20 * i, np.uint8)).save(folder / name / f"{i}.png")


def test_an_image_folder_gives_images_and_class_names(tmp_path):
    write_images(tmp_path, {"cat": 5, "dog": 5, "eel": 10})
    data = load_data(str(tmp_path), task="image-cls")
    assert data["train"].column_names == ["image", "label"]
    assert data["train"].features["label"].names == ["cat", "dog", "eel"]
    assert counts(data) == {"train": {0: 3, 1: 4, 2: 7}, "validation": {0: 1, 2: 1}, "test": {0: 1, 1: 1, 2: 2}}
    assert data["test"][0]["image"].size == (4, 4)


def test_an_image_folder_with_train_and_test_subfolders_keeps_its_split(tmp_path):
    write_images(tmp_path / "train", {"cat": 5, "dog": 5})
    write_images(tmp_path / "test", {"cat": 1, "dog": 2})
    data = load_data(str(tmp_path), task="image-cls")
    assert counts(data) == {"train": {0: 4, 1: 5}, "validation": {0: 1}, "test": {0: 1, 1: 2}}


# --- errors --------------------------------------------------------------------------------------------------


def test_an_unknown_column_lists_the_available_ones(tmp_path):
    REVIEWS.to_csv(tmp_path / "reviews.csv", index=False)
    assert message(lambda: load_data(str(tmp_path / "reviews.csv"), task="seq-cls", text_column="body")) == \
        "text_column=body: is not a column of reviews.csv; use one of id, review, category"


def test_a_column_that_cannot_be_guessed_lists_the_available_ones(tmp_path):
    REVIEWS.rename(columns={"category": "mood"}).to_csv(tmp_path / "moods.csv", index=False)
    text = message(lambda: load_data(str(tmp_path / "moods.csv"), task="seq-cls"))
    assert text.startswith("label_column=None: moods.csv has no column named label, labels or category")
    assert text.endswith("one of id, review, mood")


def test_columns_of_the_wrong_type_are_refused(tmp_path):
    REVIEWS.assign(score=np.linspace(0, 1, 20)).to_csv(tmp_path / "r.csv", index=False)
    path = str(tmp_path / "r.csv")
    assert message(lambda: load_data(path, task="seq-cls", text_column="id")).startswith(
        "text_column=id: is not a text column")
    assert message(lambda: load_data(path, task="seq-cls", label_column="score")).startswith(
        "label_column=score: holds Value('float64') values, not class labels")
    assert message(lambda: load_data(path, task="seq-cls", text_column="review", label_column="score")).startswith(
        "label_column=score: holds")
    REVIEWS.assign(category=np.linspace(0, 1, 20)).to_csv(tmp_path / "guessed.csv", index=False)
    assert message(lambda: load_data(str(tmp_path / "guessed.csv"), task="seq-cls")).startswith(
        "label_column=category: holds Value('float64') values")
    assert message(lambda: load_data(path, task="image-cls", image_column="review")).startswith(
        "image_column=review: is not an image column")


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    assert message(lambda: load_data(str(tmp_path / "blank.txt"), task="causal-lm")).startswith(
        f"data={tmp_path / 'blank.txt'}: has no usable rows")
    (tmp_path / "empty.jsonl").write_text("")
    assert message(lambda: load_data(str(tmp_path / "empty.jsonl"), task="causal-lm")).startswith(
        f"data={tmp_path / 'empty.jsonl'}: is an empty file")
    pd.DataFrame({"text": ["a", "b"], "label": [None, None]}).to_csv(tmp_path / "unlabelled.csv", index=False)
    assert "has no usable rows" in message(lambda: load_data(str(tmp_path / "unlabelled.csv"), task="seq-cls"))


def test_sources_that_cannot_be_found_are_refused(tmp_path):
    assert message(lambda: load_data(str(tmp_path / "missing.csv"), task="seq-cls")).startswith(
        f"data={tmp_path / 'missing.csv'}: is not a file")
    (tmp_path / "empty").mkdir()
    assert "could not be read" in message(lambda: load_data(str(tmp_path / "empty"), task="image-cls"))
    text = message(lambda: load_data("someone/no-such-dataset", task="seq-cls"))
    assert re.match(r"data=someone/no-such-dataset: is not a recipe, a local file or folder, or a reachable Hub", text)
    assert text.endswith("or a recipe: rotten-tomatoes, rotten-tomatoes-full, hamlet, fashion-mnist")



def test_a_hub_dataset_config_follows_a_colon(monkeypatch):
    import reshape.train.data as data_module

    asked = []

    def fake_hub(path, name=None, split=None):  # stands in for the Hub: records what was asked for
        asked.append((path, name, split))
        rows = {"sentence": ["a fine film", "dull"], "label": [1, 0]}
        train = {"sentence": [f"review {i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(train),
                                     "validation": datasets.Dataset.from_dict(rows),
                                     "test": datasets.Dataset.from_dict({**rows, "label": [-1, -1]})})

    monkeypatch.setattr(data_module, "load_dataset", fake_hub)
    data = load_data("nyu-mll/glue:sst2", task="seq-cls")
    assert asked == [("nyu-mll/glue", "sst2", None)]
    # GLUE's test split has no labels (-1): the validation split is held out instead.
    assert data["test"]["text"] == ["a fine film", "dull"] and data["test"]["label"] == [1, 0]
    # ... and validation is carved from train (stratified, 10%).
    assert (len(data["train"]), len(data["validation"])) == (18, 2) and sorted(data["validation"]["label"]) == [0, 1]

@pytest.mark.parametrize("kwargs,start", [
    ({"task": "token-cls"}, "tokens_column=None: reviews.csv has no column named tokens or words; pass the tokens"),
    ({"task": "translation"}, "task=translation: is not a task; use one of seq-cls"),
    ({"task": "seq-cls", "test_ratio": 1.0}, "test_ratio=1.0: must be between 0 and 1"),
    ({"task": "seq-cls", "test_ratio": 0.01}, "test_ratio=0.01: leaves an empty split of the 20 rows"),
    ({"task": "seq-cls", "validation_ratio": 0.0}, "validation_ratio=0.0: must be between 0 and 1"),
    ({"task": "seq-cls", "validation_ratio": 1.5}, "validation_ratio=1.5: must be between 0 and 1"),
    ({"task": "seq-cls", "validation_ratio": 0.01}, "validation_ratio=0.01: leaves an empty split of the 16 rows"),
])
def test_bad_options_are_refused(tmp_path, kwargs, start):
    REVIEWS.to_csv(tmp_path / "reviews.csv", index=False)
    assert message(lambda: load_data(str(tmp_path / "reviews.csv"), **kwargs)).startswith(start)


def test_a_class_too_small_to_stratify_is_refused(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(21)], "label": ["a"] * 10 + ["b"] * 10 + ["rare"]})
    frame.to_csv(tmp_path / "rare.csv", index=False)
    assert message(lambda: load_data(str(tmp_path / "rare.csv"), task="seq-cls")) == (
        "test_ratio=0.2: cannot stratify: class 'rare' has 1 row, which cannot be in both train and test; "
        "add rows of that class, or drop it from the data")


def test_recipes_have_fixed_splits():
    assert message(lambda: load_data("rotten-tomatoes", task="seq-cls", validation_ratio=0.2)).startswith(
        "validation_ratio=0.2: does not apply to the recipe rotten-tomatoes, whose splits are fixed")


def test_validation_and_test_splits_that_share_rows_are_named(tmp_path, caplog):
    train = pd.DataFrame({"text": [f"train {i}" for i in range(10)], "label": [i % 2 for i in range(10)]})
    train.to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"text": ["same", "only in validation"], "label": [0, 1]}).to_csv(tmp_path / "validation.csv",
                                                                                   index=False)
    pd.DataFrame({"text": ["same", "only in test"], "label": [0, 1]}).to_csv(tmp_path / "test.csv", index=False)
    data = load_data(str(tmp_path), task="seq-cls")
    assert data["validation"]["text"] == ["same", "only in validation"] and len(data["train"]) == 10
    assert "the validation and test splits share 1 rows" in caplog.text
