"""``cleanup``: the cleanup passes in the order that lets each one see what the others left."""

from __future__ import annotations

import dataclasses

from graphopt.pipeline import CompositePass, Pipeline

__all__ = ["CleanupOptions", "CleanupPass"]


@dataclasses.dataclass
class CleanupOptions:
    max_iterations: int = 8
    fold: bool = True
    cse: bool = True


class CleanupPass(CompositePass):
    """Standard cleanup: shape inference, then fold/no-op/dead-code/CSE to a fixpoint, then
    lift constants, share duplicate weights and sort.
    """

    name = "cleanup"
    Options = CleanupOptions

    def pipeline(self) -> Pipeline:
        o = self.options
        inner = ["fold-constants"] if o.fold else []
        inner += ["remove-noops", "simplify", "remove-unused"]
        if o.cse:
            inner.append("cse")
        # Weights are lifted and shared before the fixpoint so CSE sees equal weights as equal;
        # folding can create new duplicates, hence the second dedup/CSE round.
        text = (
            "normalize-legacy-inputs,shape-inference,lift-constants,dedup-initializers,"
            f"fixpoint(max_iterations={o.max_iterations})[{','.join(inner)}],"
            "lift-constants,dedup-initializers,"
            + ("cse," if o.cse else "")
            + "remove-unused,topological-sort"
        )
        return Pipeline.parse(text)
