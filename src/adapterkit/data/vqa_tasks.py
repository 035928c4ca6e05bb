"""Visual question answering tasks read offline from easy-vqa (MIT): 64x64 PNG images of one coloured shape
and questions about it, answered by one of 13 words (3 shapes, 8 colours, yes, no).

  easy-vqa          every question
  easy-vqa-colour   "what color is the shape?", "what is the color of the circle?" ... (8 colour answers)
  easy-vqa-shape    "what shape is in the image?", "what is the red shape?" ... (3 shape answers)
  easy-vqa-yesno    "is there a red shape?", "does the image not contain a circle?" ... (yes / no)

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
}


def _questions(split: str) -> list[VQAExample]:
    path = _data_file(_EASY_VQA, f"{split}/questions.json")
    images = path.parent / "images"
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [VQAExample(str(images / f"{image_id}.png"), question, answer, question_type(question),
                       f"{split}/images/{image_id}.png#{i}")
            for i, (question, answer, image_id) in enumerate(rows)]


def load_vqa_task(name: str) -> Task:
    types = VQA_TASKS[name]
    train_all = [e for e in _questions("train") if e.qtype in types]
    test = [e for e in _questions("test") if e.qtype in types]
    image_ids = sorted({e.image for e in _questions("train")})        # the same image split for every task
    random.Random("adapterkit:easy-vqa:images").shuffle(image_ids)
    held = set(image_ids[: round(0.1 * len(image_ids))])
    train = [e for e in train_all if e.image not in held]
    validation = [e for e in train_all if e.image in held]
    splits = {"train": train, "validation": validation, "test": test}
    for split, items in splits.items():
        random.Random(f"adapterkit:{name}:{split}").shuffle(items)
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
                        "image (seeded), so an image's questions stay in one split",
        "sizes": {k: len(v) for k, v in splits.items()},
        "images": {k: len({e.image for e in v}) for k, v in splits.items()},
        "type_counts": {k: dict(sorted(Counter(e.qtype for e in v).items())) for k, v in splits.items()},
        "answer_counts": {k: dict(sorted(Counter(e.answer for e in v).items())) for k, v in splits.items()},
    }
    return Task(name, train, validation, test, card)
