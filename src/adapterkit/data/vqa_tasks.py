"""Visual question answering tasks read offline from easy-vqa (MIT): 64x64 PNG images of one coloured shape
and questions about it, answered by one of 13 words (3 shapes, 8 colours, yes, no).

  easy-vqa          every question
  easy-vqa-colour   "what color is the shape?", "what is the color of the circle?" ... (8 colour answers)
  easy-vqa-shape    "what shape is in the image?", "what is the red shape?" ... (3 shape answers)
  easy-vqa-yesno    "is there a red shape?", "does the image not contain a circle?" ... (yes / no)
  easy-vqa-yesno-paired  the yes/no questions with complementary pairs in training (VQA v2's remedy, Goyal
                    et al. 2017): each training question is also asked of another training image whose answer
                    is the opposite, so the wording alone answers half of them. In the package 82 % of yes/no
                    answers follow from the wording ("not" -> yes, else no); validation and test stay as
                    they come, so scores compare with easy-vqa-yesno's.

The question type is read from the question's words (a "what" question about colour, another "what"
question, or a yes/no question), never from the answer. Splits: the package's test images are the test
split; its training images are split 90/10 by image (seeded), so no image is in two splits."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .tasks import Task, _data_file, _installed_version, _Source

QUESTION_TYPES = ("colour", "shape", "yesno")
_EASY_VQA = _Source("easy-vqa", "1.0", "easy_vqa", "data", "MIT (easy-vqa package)")


@dataclass(frozen=True)
class VQAExample:
    """One question about one image: the image (a file path or a PIL image), the question, its answer."""

    image: Any = field(compare=False)
    question: str
    answer: str
    qtype: str                      # colour, shape or yesno (QUESTION_TYPES)
    id: str                         # e.g. "train/images/12.png#3" (the question's index in questions.json)


def question_type(question: str) -> str:
    """colour, shape or yesno, from the question's words."""
    q = question.strip().lower()
    if q.startswith("what"):
        return "colour" if "color" in q or "colour" in q else "shape"
    return "yesno"


VQA_TASKS: dict[str, tuple[str, ...]] = {
    "easy-vqa": QUESTION_TYPES,
    "easy-vqa-colour": ("colour",),
    "easy-vqa-shape": ("shape",),
    "easy-vqa-yesno": ("yesno",),
    "easy-vqa-yesno-paired": ("yesno",),
}
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def asked(question: str) -> tuple[str, str, bool]:
    """The attribute a yes/no question asks about, its value and whether it is negated:
    "is there not a red shape?" -> ("colour", "red", True)."""
    words = question.strip().lower().rstrip("?").split()
    negated = "not" in words or "no" in words
    for kind, values in (("colour", COLOURS), ("shape", SHAPES)):
        hit = [w for w in words if w in values]
        if hit:
            return kind, hit[0], negated
    raise ValueError(f"easy-vqa yes/no question names no colour or shape: {question!r}")


def image_attributes(rows: list[VQAExample]) -> dict[str, dict[str, str]]:
    """{image: {"colour": c, "shape": s}} read off every question's answer (what-questions directly, a
    yes/no answer where it names the value: "is there a red shape?" yes, or "... not ... red" no)."""
    out: dict[str, dict[str, str]] = {}
    for e in rows:
        if e.qtype != "yesno":
            out.setdefault(e.image, {})[e.qtype] = e.answer
            continue
        kind, value, negated = asked(e.question)
        if (e.answer == "yes") != negated:                    # the image has `value`
            out.setdefault(e.image, {})[kind] = value
    return out


def complementary_pairs(rows: list[VQAExample], attributes: dict[str, dict[str, str]],
                        seed: str) -> list[VQAExample]:
    """`rows` (yes/no questions) and, for each, the same question on another image of `attributes` with the
    opposite answer (drawn seeded); a question whose opposite no image has is kept unpaired."""
    rng = random.Random(seed)
    by_value: dict[tuple[str, str], list[str]] = {}
    for image, attrs in sorted(attributes.items()):
        for kind, value in attrs.items():
            by_value.setdefault((kind, value), []).append(image)
    # (kind, value) -> the images with another value of that kind, built once per value
    others = {(k, v): [i for (k2, v2), images in by_value.items() if k2 == k and v2 != v for i in images]
              for k, v in by_value}
    out = list(rows)
    for e in rows:
        kind, value, negated = asked(e.question)
        has = (e.answer == "yes") != negated
        # the partner has `value` when this image has not, and another value of the same kind when it has
        pool = others.get((kind, value), []) if has else by_value.get((kind, value), [])
        if not pool:
            continue
        image = pool[rng.randrange(len(pool))]
        out.append(VQAExample(image, e.question, "no" if e.answer == "yes" else "yes", e.qtype, f"{e.id}~{image}"))
    return out


def _questions(split: str) -> list[VQAExample]:
    path = _data_file(_EASY_VQA, f"{split}/questions.json")
    images = path.parent / "images"
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [VQAExample(str(images / f"{image_id}.png"), question, answer, question_type(question),
                       f"{split}/images/{image_id}.png#{i}")
            for i, (question, answer, image_id) in enumerate(rows)]


def load_vqa_task(name: str) -> Task:
    types = VQA_TASKS[name]
    every_question = _questions("train")
    train_all = [e for e in every_question if e.qtype in types]
    test = [e for e in _questions("test") if e.qtype in types]
    image_ids = sorted({e.image for e in every_question})             # the same image split for every task
    random.Random("adapterkit:easy-vqa:images").shuffle(image_ids)
    held = set(image_ids[: round(0.1 * len(image_ids))])
    train = [e for e in train_all if e.image not in held]
    if name.endswith("-paired"):            # partners come from the training images only (none held out)
        attributes = image_attributes([e for e in every_question if e.image not in held])
        train = complementary_pairs(train, attributes, f"adapterkit:{name}:pairs")
    validation = [e for e in train_all if e.image in held]
    splits = {"train": train, "validation": validation, "test": test}
    for split, items in splits.items():     # a paired task's validation and test: the same order as unpaired
        random.Random(f"adapterkit:{name if split == 'train' else name.removesuffix('-paired')}:{split}").shuffle(items)
    answers = sorted({e.answer for part in splits.values() for e in part})
    card = {
        "name": name, "modality": "image+text", "objective": "visual question answering (a one-word answer)",
        "description": "easy-VQA (Victor Zhou): 64x64 images of one coloured shape with generated questions; "
                       f"this task keeps the {', '.join(types)} questions.",
        "source": {"package": _EASY_VQA.package, "version": _installed_version(_EASY_VQA),
                   "pinned_version": _EASY_VQA.version,
                   "files": [f"easy_vqa/data/{s}/questions.json" for s in ("train", "test")] +
                            [f"easy_vqa/data/{s}/images/*.png" for s in ("train", "test")],
                   "install": _EASY_VQA.pip_command},
        "licence": _EASY_VQA.licence, "licence_note": "easy-vqa is MIT; the images are generated",
        "fields": {"image": "a 64x64 RGB PNG", "question": "English text", "answer": "one word"},
        "question_types": list(types), "labels": answers, "num_labels": len(answers),
        "split_method": "the package's test images are the test split; its training images are split 90/10 by "
                        "image (seeded), so an image's questions stay in one split" + (
                            "; training adds each question's complementary pair (the same question on another "
                            "training image, the opposite answer), validation and test are unchanged"
                            if name.endswith("-paired") else ""),
        "sizes": {k: len(v) for k, v in splits.items()},
        "images": {k: len({e.image for e in v}) for k, v in splits.items()},
        "type_counts": {k: dict(sorted(Counter(e.qtype for e in v).items())) for k, v in splits.items()},
        "answer_counts": {k: dict(sorted(Counter(e.answer for e in v).items())) for k, v in splits.items()},
    }
    return Task(name, train, validation, test, card)
