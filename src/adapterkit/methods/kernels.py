"""Mixed-batch kernels for low-rank deltas, and the float64 reference they are tested against; and
what the other families' pools share: `routed` (per adapter), `HeldPool`, and the per-step
`UnitPlan` with the cost rule that picks one block-diagonal call or one call per adapter, and the
block-diagonal call's `Columns`.

Shapes: x [n, L, d_in], y [n, L, d_out] (n units = rows or tokens, L tokens per unit); stacked
slot tensors A [S, d_in, R], B [S, R, d_out] with slot 0 all zeros and the scale folded into B;
per-adapter tensors A [r, d_in], B [d_out, r] in PEFT's layout. Every kernel adds into y in place
and returns it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch


def dense_kernel(
    x: torch.Tensor,
    y: torch.Tensor,
    terms: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable | None]],
) -> torch.Tensor:
    """y += sum_u (w_u * (pre_u(x) @ A_u^T)) @ B_u^T   for terms (A_u, B_u, w_u [n,1,1], pre_u).

    w_u carries the per-unit weight times the adapter's scale; pre_u is dropout or None.
    Masked dense: every unit runs through every adapter in the batch, masked by its weight (a
    unit with weight 0 gets exactly 0 from that adapter, whatever the adapter's values). Best
    for few distinct adapters; the only kernel gradients flow through (it reads the live tensors).
    """
    in_place = not torch.is_grad_enabled() and y.is_contiguous()
    for a, b, w, pre in terms:
        xin = pre(x) if pre is not None else x
        h = torch.matmul(xin.to(a.dtype), a.t()) * w.to(a.dtype)   # [n, L, r]
        # Units without this adapter (w = 0) get exactly 0 even where x @ A^T overflowed: 0 * inf = NaN
        # would leak one adapter's overflow into every row of the batch.
        h = h.masked_fill(w == 0, 0.0)
        if in_place and b.dtype == y.dtype:
            # y2d += h2d @ B^T without an [n, L, d_out] temporary (prefill: saves a pass over y)
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.t())
        else:
            y = y + torch.matmul(h, b.t()).to(y.dtype)                # [n, L, d_out]
    return y


def gather_kernel(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    idx: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """y[i] += w[i] * x[i] @ A[idx[i]] @ B[idx[i]]   for each position k (BGMV, Punica).

    Gathers each unit's slot tensors and runs two batched matmuls: cost grows with units, not
    with distinct adapters.
    """
    for ids, w in zip(idx, weights):
        a = a_stack.index_select(0, ids)                             # [n, d_in, R]
        h = torch.bmm(x, a)                                          # [n, L, R]
        if w is not None:
            h.mul_(w)
        y.baddbmm_(h, b_stack.index_select(0, ids))                  # += [n, L, d_out]
    return y


def segment_kernel(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    order: torch.Tensor,
    bounds: Sequence[int],
    slots: Sequence[int],
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """y[order[s[j]:s[j+1]]] += w * x[order[s[j]:s[j+1]]] @ A[slot_j] @ B[slot_j]   (SGMV).

    Units sorted by slot once per step; one matmul pair per segment. Best for long segments
    (prefill, packed sequences) and many adapters.
    """
    xs = x.index_select(0, order)                                     # [m, L, d_in]
    ys = torch.empty(xs.shape[0], xs.shape[1], y.shape[-1], dtype=y.dtype, device=y.device)
    for j, slot in enumerate(slots):
        s, e = bounds[j], bounds[j + 1]
        h = torch.matmul(xs[s:e], a_stack[slot])                      # [m_j, L, R]
        if weights is not None:
            h.mul_(weights[s:e])
        torch.matmul(h, b_stack[slot], out=ys[s:e])
    return y.index_add_(0, order, ys)


def reference_delta(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor:
    """float64 slow reference: delta[i] = sum_k w[i,k] * scale * x[i] @ A^T @ B^T, unit by unit.

    x [n, L, d_in]; ids/weights [n, K]; factors: slot -> (A [r, d_in], B [d_out, r], scale).
    """
    n, length, _ = x.shape
    d_out = next(iter(factors.values()))[1].shape[0] if factors else 0
    out = torch.zeros(n, length, d_out, dtype=torch.float64)
    for i in range(n):
        for k in range(ids.shape[1]):
            slot = int(ids[i, k])
            if slot == 0:
                continue
            a, b, scale = factors[slot]
            xi = x[i].double()
            out[i] += float(weights[i, k]) * scale * (xi @ a.double().t() @ b.double().t())
    return out


def routed(batch: Any, held: Mapping[int, Any], fn: Callable[[Any, torch.Tensor], torch.Tensor], src: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """out + w_u · fn(held[s], src[u]) for every unit u routed to a slot s this pool holds.

    src [n, L, d_in], out [n, L, d_out] (batch.view_input shapes); fn(adapter's tensors, src rows) ->
    [m, L, d_out]. The dense kernel (training; gradients flow) runs every adapter of the step on all
    units, masked by weight; the others gather each adapter's units and run it once per adapter
    position (one fn call and one index_add per adapter): the kernel of families whose per-row work
    is not a low-rank product (bottleneck MLPs, sparse entries, dense changes)."""
    if batch.kernel == "dense":
        for slot, w in batch.slot_weights.items():
            if slot in held:
                out = out + w.to(out.dtype) * fn(held[slot], src)
        return out
    result = None
    for idx, w in zip(*batch.gather_plan):
        for slot in batch.unique:
            if slot not in held:
                continue
            rows = (idx == slot).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            term = fn(held[slot], src[rows])
            term = term if w is None else term * w[rows].to(term.dtype)
            result = (out.clone() if result is None else result).index_add_(0, rows, term)
    return out if result is None else result


class HeldPool:
    """The part of a site pool every family but LoRA shares: `held` maps a slot to what `hold` makes of
    an adapter's tensors (the adapter's own tensors, so the dense kernel's gradients reach them), and any
    derived layout (stacks for the gathered kernels) is marked stale by every change and rebuilt by
    `ensure` before the next gathered step. Subclasses implement `hold`, `rebuild` and `apply`."""

    def __init__(self, site: Any) -> None:
        self.site = site
        self.held: dict[int, Any] = {}
        self._stale = True

    DERIVED: tuple[str, ...] = ()          # attributes rebuild() makes: not copied (a copy rebuilds them)

    def __len__(self) -> int:
        return len(self.held)

    def __deepcopy__(self, memo: dict) -> "HeldPool":
        """A copy of the held adapters; the derived layout is rebuilt on the copy's first gathered step
        (some of it, sparse CSR tensors, cannot be deep-copied)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in self.DERIVED:
                setattr(new, key, copy.deepcopy(value, memo))
        new._stale = True
        return new

    def hold(self, config: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def rebuild(self) -> None:
        """Re-derive the gathered kernels' layout from `held` (nothing by default)."""

    def add(self, slot: int, config: Any, tensors: Mapping[str, torch.Tensor], site_name: str) -> None:
        self.held[slot] = self.hold(config, tensors)
        self._stale = True

    def remove(self, slot: int) -> None:
        self.held.pop(slot, None)
        self._stale = True

    def resize(self, capacity: int) -> None:
        self._stale = True

    def refresh(self, slot: int) -> None:
        self._stale = True                 # trained tensors: re-laid before the next gathered step

    def ensure(self) -> None:
        if self._stale:
            self.rebuild()
            self._stale = False


# Stacked copies of a step's adapters are kept for this many adapter sets per pool (the current step's and
# the one before: continuous batching changes the set when requests come and go); each is about the
# size of those adapters' own tensors at the site, so more would hold memory for sets that rarely return.
STACKS_KEPT = 2


@dataclass(frozen=True)
class UnitPlan:
    """The units of one step that are routed to the adapters one pool holds, by adapter. Built on the
    host once per step for each set of slots (every site holding the same adapters shares it), on the
    batch's device. A pair is (unit, adapter position) with a slot in `slots`.

    slots   the step's slots the pool holds, sorted (m of them)
    units   [r] long: the units routed to any of them
    local   [P] long: each pair's unit as an index into units; target = units[local]
    block   [P] long: each pair's adapter as an index into slots
    rank    [P] long: each pair's place among its adapter's pairs (0 .. counts[block] - 1)
    weight  [P, 1, 1] or None (every weight 1)
    groups  per slot: (its pairs' local [P_s], their weights [P_s, 1, 1] or None)
    counts  per slot: its number of pairs (host ints, for the cost rule)"""
    slots: tuple[int, ...]
    units: torch.Tensor
    local: torch.Tensor
    target: torch.Tensor
    block: torch.Tensor
    rank: torch.Tensor
    weight: torch.Tensor | None
    groups: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    counts: tuple[int, ...]


def unit_plan(batch: Any, held: Mapping[int, Any]) -> UnitPlan | None:
    """The plan of the step's units routed to slots in `held` (None: no unit is)."""
    slots = tuple(s for s in batch.unique if s in held)
    if not slots:
        return None
    memo = batch.memo
    if ("units", slots) not in memo:
        memo["units", slots] = _unit_plan(batch, slots)
    return memo["units", slots]


def covers_every_unit(batch: Any, held: Mapping[int, Any]) -> bool:
    """Does every unit of the step have an adapter, and every adapter of the step a place in `held`?
    (Then a kernel over all units wastes nothing on units of other pools or of the bare base.) The
    batch-wide half is computed once per step; the rest is a set comparison in C, ~1 us."""
    memo = batch.memo
    if "all units adapted" not in memo:
        memo["all units adapted"] = (frozenset(batch.unique), bool((batch.ids > 0).any(dim=1).all()))
    step_slots, all_adapted = memo["all units adapted"]
    return all_adapted and held.keys() >= step_slots


def _unit_plan(batch: Any, slots: tuple[int, ...]) -> UnitPlan:
    ids, weights = batch.ids, batch.weights                           # [n, K] on the host
    chosen = torch.tensor(slots, device="cpu")                        # host plan (ids are on the host)
    unit, pos = torch.nonzero(torch.isin(ids, chosen), as_tuple=True)  # [P] pairs, sorted by unit
    units, local = torch.unique(unit, return_inverse=True)
    block = torch.searchsorted(chosen, ids[unit, pos])
    w = weights[unit, pos]
    dev, dt = batch.device, batch.dtype

    def weight_of(sel: torch.Tensor) -> torch.Tensor | None:
        return None if bool((sel == 1).all()) else sel.to(device=dev, dtype=dt).view(-1, 1, 1)

    counts = torch.bincount(block, minlength=len(slots))
    order = torch.argsort(block, stable=True)
    rank = torch.empty_like(block)
    rank[order] = torch.arange(block.numel(), device="cpu") - (torch.cumsum(counts, 0) - counts)[block[order]]
    groups = []
    for b in range(len(slots)):
        sel = block == b
        groups.append((local[sel].to(dev), weight_of(w[sel])))
    return UnitPlan(slots=slots, units=units.to(dev), local=local.to(dev), target=unit.to(dev), block=block.to(dev),
                    rank=rank.to(dev), weight=weight_of(w), groups=tuple(groups), counts=tuple(counts.tolist()))


def block_diagonal_is_cheaper(plan: UnitPlan, tokens: int, work: Sequence[int], call_cost: int) -> bool:
    """Run the step's m adapters as one block-diagonal call, or one call per adapter?

    The block-diagonal call gives each adapter its own columns of input, as many as the adapter with the
    most pairs has (c_max; the others' padding columns are zeros): it does (c_max - c_s) units' work more
    than needed for each adapter s (none in decode with one unit per adapter); the per-adapter calls pay
    a fixed cost each (launches, gathers; in multiply-adds, call_cost). work: multiply-adds per token of
    each slot in plan.slots."""
    most = max(plan.counts)
    redundant = sum((most - c) * tokens * w for c, w in zip(plan.counts, work))
    return redundant <= (len(plan.slots) - 1) * call_cost


@dataclass(frozen=True)
class Columns:
    """Where a step's pairs sit in the block-diagonal product's input: adapter b's pairs in columns
    b · c_max .. b · c_max + counts[b] - 1 (c_max = most: the most pairs any adapter has).

    column  [P]: each pair's column
    unit    [m · c_max]: each column's unit, or None where some columns are padding
    weight  [P or m · c_max, 1, 1]: the pairs' weights in the order the product's output is added
            (by column where unit is set, by pair otherwise), or None (every weight 1)"""
    column: torch.Tensor
    most: int
    unit: torch.Tensor | None
    weight: torch.Tensor | None


def columns(batch: Any, plan: Any) -> Columns:
    """The step's column layout for `plan` (made once per step, shared by the sites)."""
    key = ("columns", plan.slots)
    if key not in batch.memo:
        most = max(plan.counts)
        batch.memo[key] = _laid_out(plan, plan.block * most + plan.rank, most, len(plan.counts))
    return batch.memo[key]


def _laid_out(plan: UnitPlan, column: torch.Tensor, most: int, blocks: int) -> Columns:
    """The Columns of pairs placed at `column` in `blocks` blocks of `most` columns; where no column is
    padding, the units (and weights) are reordered by column so the output adds without a gather."""
    unit, weight = None, plan.weight
    if blocks * most == column.numel():                        # every block has c_max pairs
        unit = torch.empty_like(plan.target).index_copy_(0, column, plan.target)
        if weight is not None:
            weight = torch.empty_like(weight).index_copy_(0, column, weight)
    return Columns(column=column, most=most, unit=unit, weight=weight)


def column_inputs(x: torch.Tensor, plan: UnitPlan, lay: Columns, dtype: torch.dtype,
                  blocks: int | None = None) -> torch.Tensor:
    """x [n, L, d] -> the block-diagonal call's input [m · c_max, L, d] in dtype (zeros where padding;
    m: the plan's slots, or `blocks` of a span)."""
    if lay.unit is not None:                    # no padding: each column is one pair's unit
        return x.index_select(0, lay.unit).to(dtype)
    pairs = x.index_select(0, plan.target).to(dtype)
    m = len(plan.slots) if blocks is None else blocks
    return pairs.new_zeros((m * lay.most,) + tuple(pairs.shape[1:])).index_copy_(0, lay.column, pairs)


def add_columns(out: torch.Tensor, ys: torch.Tensor, plan: UnitPlan, lay: Columns) -> torch.Tensor:
    """out [n, L, d_out] += each pair's weight times its column of ys [m · c_max, L, d_out], in place."""
    unit = lay.unit
    if unit is None:
        ys, unit = ys.index_select(0, lay.column), plan.target                          # [P, L, d_out]
    ys = ys if lay.weight is None else ys * lay.weight.to(ys.dtype)
    # index_put_ accumulating: index_add_'s sum; it was the cheaper call in a one-off timing here (no benchmark)
    return out.index_put_((unit,), ys.to(out.dtype), accumulate=True)


@dataclass(frozen=True)
class Span:
    """A step's units laid out on a contiguous range of slot stacks, so a kernel reads the stacks'
    slots lo .. lo + s - 1 as a view instead of gathering a copy per unit: slot lo + j owns columns
    j · c .. j · c + c - 1 (c: the most pairs any slot has; slots of the range that the step does not
    use, and slots with fewer pairs, get zero columns). `lay`: the Columns of that layout."""
    lo: int
    s: int
    lay: Columns


# The span kernel computes every column of its range, padding included; the per-unit gather computes only
# the pairs but copies each unit's slot tensors first. Take the span while its padding columns' tokens are
# at most the pairs' own (decode: up to 2x the columns; a long prefill: next to no padding).
SPAN_MAX_PADDING = 1.0


def span_of(batch: Any, plan: UnitPlan, tokens: int) -> Span | None:
    """The span layout of `plan` (None: too much padding for `tokens` tokens per unit). Made once per
    step and set of slots, shared by the sites."""
    key = ("span", plan.slots, tokens)
    if key not in batch.memo:
        lo, s, most = plan.slots[0], plan.slots[-1] - plan.slots[0] + 1, max(plan.counts)
        pairs = plan.block.numel()
        span = None
        if (s * most - pairs) * tokens <= SPAN_MAX_PADDING * pairs:
            offset = torch.tensor(plan.slots, device=plan.block.device)[plan.block] - lo
            span = Span(lo=lo, s=s, lay=_laid_out(plan, offset * most + plan.rank, most, s))
        batch.memo[key] = span
    return batch.memo[key]


def span_kernel(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                plan: UnitPlan, span: Span) -> torch.Tensor:
    """y[u] += w · x[u] @ A[slot] @ B[slot] for each (unit u, slot) pair of `plan`, reading the stacks'
    slots span.lo .. span.lo + span.s - 1 in place (a view: no per-unit copy of A and B, which the gather
    kernel makes; benchmarks/mixed_batch.py --copy-gather times the two side by side).
    Columns: [s · c, L, d_in] -> [s, c · L, d_in] @ A [s, d_in, R] @ B [s, R, d_out]."""
    lay, n_tok = span.lay, x.shape[1]
    xs = column_inputs(x, plan, lay, x.dtype, blocks=span.s)                          # [s · c, L, d_in]
    h = torch.bmm(xs.view(span.s, lay.most * n_tok, -1), a_stack.narrow(0, span.lo, span.s))
    ys = torch.bmm(h, b_stack.narrow(0, span.lo, span.s))                            # [s, c · L, d_out]
    return add_columns(y, ys.view(span.s * lay.most, n_tok, -1), plan, lay)
