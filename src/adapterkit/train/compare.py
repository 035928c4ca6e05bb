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


def compare_outcomes(old_right: Sequence[bool], new_right: Sequence[bool]) -> dict[str, Any]:
    """Flip rates from per-row right / wrong outcomes (instruction adapters: greedy exact match)."""
    n = len(old_right)
    if n != len(new_right) or not n:
        raise ConfigError(f"compare needs one old and one new outcome per row (> 0 rows), got {n} and {len(new_right)}")
    neg = [o and not p for o, p in zip(old_right, new_right)]
    pos = [p and not o for o, p in zip(old_right, new_right)]
    old_acc, new_acc = sum(old_right) / n, sum(new_right) / n
    return {"n": n, "old_accuracy": old_acc, "new_accuracy": new_acc, "gain": new_acc - old_acc,
            "negative_flip_rate": sum(neg) / n, "positive_flip_rate": sum(pos) / n,
            "inconsistency": sum(o != p for o, p in zip(old_right, new_right)) / n,
            "negative_flips": sum(neg), "positive_flips": sum(pos), "per_class": [],
            "negative_flip_rows": [i for i, flipped in enumerate(neg) if flipped]}


def compare_instruction_rows(old: Sequence[dict], new: Sequence[dict], rise: float = 0.1) -> dict[str, Any]:
    """Instruction adapters (instruct.score_records rows): flips of greedy exact match, and per-example score
    drops: each row's completion loss (mean NLL per token), the share of rows whose loss rose by more than
    `rise` nats, and the rows that got worst."""
    out = compare_outcomes([bool(r["exact"]) for r in old], [bool(r["exact"]) for r in new])
    lo = [r["loss_sum"] / max(r["tokens"], 1) for r in old]
    ln = [r["loss_sum"] / max(r["tokens"], 1) for r in new]
    worst = sorted(range(len(lo)), key=lambda i: lo[i] - ln[i])[:5]
    out.update({"metric": "exact_match", "old_loss": sum(lo) / len(lo), "new_loss": sum(ln) / len(ln),
                "loss_rise_rate": sum(b - a > rise for a, b in zip(lo, ln)) / len(lo), "loss_rise_nats": rise,
                "worst_rows": [{"row": i, "old_loss": lo[i], "new_loss": ln[i]} for i in worst if ln[i] > lo[i]]})
    return out


def compare_adapters(base: Any, old: Any, new: Any, examples: Sequence[Any], max_length: int = 128,
                     progress: bool = False) -> dict[str, Any]:
    """Score two adapters of one base on `examples` and compare: classifiers (the same labels) on labelled
    rows; instruction adapters (no head) on prompt/completion records."""
    import copy

    from ..core.runtime import AdapterRuntime
    from .run import score

    if old.head is None and new.head is None:
        from .instruct import score_records

        rt = AdapterRuntime.from_base(base)
        old, new = copy.copy(old), copy.copy(new)
        old.name, new.name = "compare-old", "compare-new"
        rt.add(old)
        rt.add(new)
        return compare_instruction_rows(score_records(rt, old.name, examples, max_length, progress=progress),
                                        score_records(rt, new.name, examples, max_length, progress=progress))
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
