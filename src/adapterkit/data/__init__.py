"""Example tasks read offline from pip-packaged corpora, and readers for user JSONL/CSV files."""

from adapterkit.data.readers import DataFormatError, ReadProblem, ReadResult, read_examples
from adapterkit.data.tasks import (
    TASKS,
    DataNotAvailableError,
    Example,
    Task,
    UnknownTaskError,
    list_tasks,
    load_task,
)

__all__ = [
    "TASKS",
    "DataFormatError",
    "DataNotAvailableError",
    "Example",
    "ReadProblem",
    "ReadResult",
    "Task",
    "UnknownTaskError",
    "list_tasks",
    "load_task",
    "read_examples",
]
