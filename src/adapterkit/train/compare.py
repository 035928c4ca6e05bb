"""Compatibility of an adapter update (MUSCLE, Echterhoff et al. 2024): how an update changes the
predictions users already had, not just the accuracy.

  negative flip rate (NFR)  share of rows the OLD adapter got right and the NEW one gets wrong
  positive flip rate        share of rows OLD got wrong and NEW gets right
  inconsistency             share of rows whose prediction changed at all
  gain                      NEW accuracy - OLD accuracy (= positive flip rate - NFR)

Per class (by gold label): rows, old and new accuracy, negative and positive flips. `compare_predictions`
is a pure function of the three label lists; `compare_adapters` scores both adapters on the same rows
(one runtime, both attached) and calls it.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import ConfigError


def compare_predictions(gold: Sequence[str], old: Sequence[str], new: Sequence[str]) -> dict[str, Any]:
    """The update's numbers over rows with `gold` labels and the two adapters' predictions."""
    if not (len(gold) == len(old) == len(new)) or not gold:
        raise ConfigError(f"compare needs one old and one new prediction per row (> 0 rows), got {len(gold)} rows, "
                          f"{len(old)} old and {len(new)} new predictions")
    n = len(gold)
    neg = [o == g and p != g for g, o, p in zip(gold, old, new)]
    pos = [o != g and p == g for g, o, p in zip(gold, old, new)]
    old_acc = sum(o == g for g, o in zip(gold, old)) / n
    new_acc = sum(p == g for g, p in zip(gold, new)) / n
    classes = []
    for label in sorted(set(gold)):
        rows = [i for i, g in enumerate(gold) if g == label]
        classes.append({"label": label, "rows": len(rows),
                        "old_accuracy": sum(old[i] == label for i in rows) / len(rows),
                        "new_accuracy": sum(new[i] == label for i in rows) / len(rows),
                        "negative_flips": sum(neg[i] for i in rows), "positive_flips": sum(pos[i] for i in rows)})
    return {"n": n, "old_accuracy": old_acc, "new_accuracy": new_acc, "gain": new_acc - old_acc,
            "negative_flip_rate": sum(neg) / n, "positive_flip_rate": sum(pos) / n,
            "inconsistency": sum(o != p for o, p in zip(old, new)) / n,
            "negative_flips": sum(neg), "positive_flips": sum(pos), "per_class": classes,
            "negative_flip_rows": [i for i, flipped in enumerate(neg) if flipped]}


def compare_adapters(base: Any, old: Any, new: Any, examples: Sequence[Any], max_length: int = 128,
                     progress: bool = False) -> dict[str, Any]:
    """Score two classification adapters (of one base, with the same labels) on `examples` and compare."""
    import copy

    from ..core.runtime import AdapterRuntime
    from .run import score

    if list(old.head.labels if old.head is not None else []) != list(new.head.labels if new.head is not None
                                                                     else []):
        raise ConfigError(f"compare needs two classifiers of the same labels; the old adapter has "
                          f"{getattr(old.head, 'labels', None)}, the new {getattr(new.head, 'labels', None)}")
    rt = AdapterRuntime.from_base(base)
    old, new = copy.copy(old), copy.copy(new)
    old.name, new.name = "compare-old", "compare-new"          # two versions of one name attach side by side
    rt.add(old)
    rt.add(new)
    a = score(rt, old, examples, max_length, progress)
    b = score(rt, new, examples, max_length, progress)
    return compare_predictions(a.gold, a.predicted, b.predicted)


def gate_problems(numbers: dict[str, Any], max_nfr: float | None, min_gain: float | None) -> list[str]:
    """Why a promotion gate refuses an update with these comparison numbers ([]: it passes)."""
    problems = []
    if max_nfr is not None and numbers["negative_flip_rate"] > max_nfr:
        problems.append(f"negative flip rate {numbers['negative_flip_rate']:.4f} > {max_nfr} "
                        f"({numbers['negative_flips']} of {numbers['n']} rows the old version got right)")
    if min_gain is not None and numbers["gain"] < min_gain:
        problems.append(f"accuracy gain {numbers['gain']:+.4f} < {min_gain:+} "
                        f"({numbers['old_accuracy']:.4f} -> {numbers['new_accuracy']:.4f})")
    return problems
