"""Readers for user data files: JSONL and CSV/TSV with field mapping, bad lines reported as file:line.

``read_examples(path, text_field="text", label_field="label", on_error="raise")`` returns a
:class:`ReadResult` (iterable, ``len()``, ``.examples``, ``.problems``). With ``on_error="raise"``
the first bad line raises :class:`DataFormatError` whose message starts with ``path:line:``; with
``on_error="skip"`` bad lines are skipped and collected in ``.problems``.

Problems that concern the whole file (no such file, a CSV header without the mapped columns, an
unknown extension, a file with no usable example, text rows mixed with image rows) always raise.

A JSONL row without the text field but with "image" is an image example (data/image_tasks.ImageExample):
a file path (relative paths are relative to the JSONL file's folder) or a `data:image/...;base64,` URL,
as `adapterkit data export` writes for an image task; the image is decoded when a batch needs it.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from adapterkit.data.image_tasks import ImageExample
from adapterkit.data.tasks import Example
from adapterkit.errors import AdapterkitError

__all__ = ["DataFormatError", "ReadProblem", "ReadResult", "read_examples", "read_records"]


class DataFormatError(AdapterkitError, ValueError):
    """A user data file that cannot be read: missing, malformed lines, missing fields."""


@dataclass(frozen=True)
class ReadProblem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ReadResult:
    path: str
    examples: list[Example] = field(default_factory=list)
    problems: list[ReadProblem] = field(default_factory=list)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.examples})

    def report(self) -> str:
        """A human-readable summary: counts, then one line per problem."""
        head = f"{self.path}: {len(self.examples)} examples read, {len(self.problems)} lines skipped"
        return "\n".join([head, *(str(p) for p in self.problems)])


_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def text_value(v: object, name: str) -> str:
    """A field value as text; raises ValueError with the problem."""
    if v is None:
        raise ValueError(f"field {name!r} is null")
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"field {name!r} must be a string, got {type(v).__name__}")
    s = str(v)
    if not s.strip():
        raise ValueError(f"field {name!r} is empty")
    return s


def _jsonl_records(path: Path, text_field: str, label_field: str):
    """Yields (line, Example | problem message)."""
    for lineno, obj in jsonl_objects(path):
        if not isinstance(obj, str) and text_field not in obj and "image" in obj:
            yield lineno, _image_example(obj, label_field, f"{path.name}:{lineno}", path.parent)
            continue
        yield lineno, obj if isinstance(obj, str) else _example_from(obj, text_field, label_field, "fields")


def _image_example(record: dict, label_field: str, where: str, folder: Path) -> ImageExample | str:
    value = record["image"]
    if not isinstance(value, str) or not value.strip():
        return "field 'image' must be a file path or a data:image/...;base64, URL"
    if label_field not in record:
        return f"missing field {label_field!r} (fields present: {', '.join(repr(k) for k in record)})"
    try:
        label = text_value(record[label_field], label_field)
    except ValueError as e:
        return str(e)
    if not value.startswith("data:") and not Path(value).is_absolute():
        value = str(folder / value)
    return ImageExample(value, label, where)


def jsonl_objects(path: Path):
    """Yields (line, dict | problem message) for every line of a JSONL file."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, f"not valid UTF-8 (byte {e.start + 1})"
                continue
            if not line.strip():
                yield lineno, "empty line"
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield lineno, f"malformed JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(obj, dict):
                yield lineno, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield lineno, obj


def _example_from(record: dict, text_field: str, label_field: str, what: str) -> Example | str:
    for name in (text_field, label_field):
        if name not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            return f"missing field {name!r} ({what} present: {present})"
    try:
        return Example(text_value(record[text_field], text_field), text_value(record[label_field], label_field))
    except ValueError as e:
        return str(e)


def _csv_records(path: Path, text_field: str, label_field: str, delimiter: str):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8 (the whole file must be UTF-8)") from None
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(f"{path}: empty file, expected a header row") from None
    except csv.Error as e:
        raise DataFormatError(f"{path}:1: malformed CSV header: {e}") from None
    header = [h.strip() for h in header]
    for name in (text_field, label_field):
        if name not in header:
            cols = ", ".join(repr(h) for h in header)
            raise DataFormatError(
                f"{path}:1: missing column {name!r} in the header (columns: {cols}); "
                f"map your columns with text_field=/label_field="
            )
    prev = reader.line_num
    while True:
        start = prev + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, f"malformed CSV: {e}"
            return  # the reader cannot resynchronise after e.g. an unterminated quote
        prev = reader.line_num
        if not row or all(not c.strip() for c in row):
            yield start, "empty line"
            continue
        if len(row) != len(header):
            yield start, f"expected {len(header)} columns, got {len(row)}"
            continue
        yield start, _example_from(dict(zip(header, row)), text_field, label_field, "columns")


def read_records(path: str | Path, on_error: Literal["raise", "skip"] = "raise") -> tuple[list[dict], list[ReadProblem]]:
    """Every JSON object of a JSONL file (instruction data: prompt/completion or messages)."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file")
    records, problems = [], []
    for lineno, obj in jsonl_objects(p):
        if isinstance(obj, str):
            if on_error == "raise":
                raise DataFormatError(f"{p}:{lineno}: {obj}")
            problems.append(ReadProblem(str(p), lineno, obj))
        else:
            records.append(obj)
    if not records:
        raise DataFormatError(f"{p}: no usable records")
    return records, problems


def read_examples(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    on_error: Literal["raise", "skip"] = "raise",
    format: Literal["jsonl", "csv", "tsv"] | None = None,
) -> ReadResult:
    """Read labelled examples from a JSONL, CSV or TSV file (format from the extension unless given)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    fmt = format or _FORMATS.get(p.suffix.lower())
    if fmt not in ("jsonl", "csv", "tsv"):
        raise DataFormatError(
            f"{p}: cannot tell the format from the extension {p.suffix!r}; use .jsonl, .csv or .tsv "
            f"or pass format='jsonl'|'csv'|'tsv'"
        )
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file")
    if fmt == "jsonl":
        records = _jsonl_records(p, text_field, label_field)
    else:
        records = _csv_records(p, text_field, label_field, "\t" if fmt == "tsv" else ",")
    result = ReadResult(str(p))
    for lineno, item in records:
        if isinstance(item, (Example, ImageExample)):
            if result.examples and type(item) is not type(result.examples[0]):
                raise DataFormatError(f"{p}:{lineno}: this file mixes text rows and image rows; put each in its "
                                      "own file (a base takes one or the other)")
            result.examples.append(item)
            continue
        problem = ReadProblem(str(p), lineno, item)
        if on_error == "raise":
            raise DataFormatError(str(problem))
        result.problems.append(problem)
    if not result.examples:
        detail = f" ({len(result.problems)} bad lines, first: {result.problems[0]})" if result.problems else ""
        raise DataFormatError(f"{p}: no examples read{detail}")
    return result
