"""merge/: pure tensor functions over ΔW = scale · B @ A per site, one file per family.

    from adapterkit.merge import merge, merge_reversible, recover
    merged = merge([a, b, c], method="ties", density=0.3, weights=[1, 1, 0.5])
    rev = merge_reversible([a, b, c], k=2);  a2 = recover(rev, "a")

concat.py (exact, ranks add) · linear.py (weighted sum, task arithmetic) · ties.py (TIES, magnitude
pruning) · dare.py (DARE, DARE+TIES) · svd.py (re-factorisation to a rank, with its error) ·
reversible.py (basis + coefficients) · recipe.py (YAML recipes) · api.py (the method registry).
"""

from .api import (METHODS, MergeMethod, MergeReport, get_merge_method, merge, merge_method_names,
                  merge_with_report)
from .recipe import MergeRecipe, load_recipe, parse_recipe, run_recipe
from .reversible import ReversibleMerge, merge_reversible, recover

__all__ = ["METHODS", "MergeMethod", "MergeReport", "get_merge_method", "merge", "merge_method_names",
           "merge_with_report", "MergeRecipe", "load_recipe", "parse_recipe", "run_recipe",
           "ReversibleMerge", "merge_reversible", "recover"]
