"""The data path, in reading order: base.py (a frozen base) -> adapter.py (an adapter's tensors and
metadata) -> targets.py (the modules it adapts) -> batching.py (per-step routing metadata) ->
sites.py (one hook per attachment point) -> runtime.py (slots, attach, batches) -> merging.py
(merge into the base, unmerge, export); generate.py and heads.py build on it."""
