"""The structure of an ONNX model's graphs: every name defined once and before it is used, no cycle.

ONNX's checker reports all of these as "not topologically sorted" (or not at all, for subgraphs'
outer references and graph outputs), and a graph whose nodes are merely listed out of order is fine
for ONNX Runtime. So :func:`check_structure` names what is wrong (the node, the value, the cycle),
and sorts a graph that is only out of order (stable: a sorted graph keeps its order).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, MutableSequence, Sequence

import onnx

from graphopt.errors import InvalidModelError

__all__ = ["all_graphs", "all_nodes", "check_structure", "describe_node"]


def all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: main graph, subgraphs (any depth) and local functions."""
    stack: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    stack.extend(proto.graph.node)
    while stack:
        n = stack.pop()
        yield n
        for a in n.attribute:
            if a.HasField("g"):
                stack.extend(a.g.node)
            for g in a.graphs:
                stack.extend(g.node)


def all_graphs(proto: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, str]]:
    """The main graph and every subgraph (any depth, local functions' too), with where it sits."""
    stack: list[tuple[onnx.GraphProto, str]] = [(proto.graph, "")]
    nodes = [(n, f" in function '{f.name}'") for f in proto.functions for n in f.node]
    while stack or nodes:
        if stack:
            g, ctx = stack.pop()
            yield g, ctx
            nodes.extend((n, ctx) for n in g.node)
            continue
        n, ctx = nodes.pop()
        sub = f" in a subgraph of {describe_node(n)}{ctx}"
        for a in n.attribute:
            if a.HasField("g"):
                stack.append((a.g, sub))
            stack.extend((g, sub) for g in a.graphs)


def describe_node(n: onnx.NodeProto, index: int | None = None) -> str:
    if n.name:
        return f"node '{n.name}' ({n.op_type})"
    return f"node #{index} ({n.op_type})" if index is not None else f"a nameless {n.op_type} node"


def check_structure(proto: onnx.ModelProto, where: str, *, apply: bool) -> bool:
    """Every graph and local function: defined names, no cycle, outputs produced. Returns whether
    any graph is out of topological order (sorted in place when ``apply``)."""
    unsorted = False
    for f in proto.functions:
        ctx = f" in function '{f.name}'"
        defined = set(f.input)
        unsorted |= _sort_nodes(f.node, defined, set(), ctx, where, apply)[1]
        for o in f.output:
            if o not in defined and not any(o in n.output for n in f.node):
                raise InvalidModelError(
                    f"{where}: output '{o}'{ctx} is not produced by any node of the function"
                )
    unsorted |= _check_graph(proto.graph, set(), "", where, apply, main=True)[1]
    return unsorted


def _check_graph(
    g: onnx.GraphProto, outer: set[str], ctx: str, where: str, apply: bool, main: bool = False
) -> tuple[set[str], bool]:
    """Check one graph; returns (names it uses from the enclosing scopes, whether it was unsorted)."""
    defined: set[str] = set()
    for i, v in enumerate(g.input):
        if not v.name:
            raise InvalidModelError(f"{where}: graph input #{i}{ctx} has an empty name; name it")
        defined.add(v.name)
    defined.update(t.name for t in g.initializer)
    defined.update(sp.values.name for sp in g.sparse_initializer)
    if main and not g.output:
        raise InvalidModelError(f"{where}: the graph has no outputs, so there is nothing to compute")
    free, unsorted = _sort_nodes(g.node, defined, outer, ctx, where, apply)
    produced = defined | {o for n in g.node for o in n.output if o}
    for i, v in enumerate(g.output):
        if not v.name:
            raise InvalidModelError(f"{where}: graph output #{i}{ctx} has an empty name; name it")
        if v.name in produced:
            continue
        if v.name in outer:
            free.add(v.name)
            continue
        raise InvalidModelError(
            f"{where}: graph output '{v.name}'{ctx} is not a graph input, initializer or output of any node"
        )
    return free, unsorted


def _sort_nodes(
    nodes: MutableSequence[onnx.NodeProto],
    defined: set[str],
    outer: set[str],
    ctx: str,
    where: str,
    apply: bool,
) -> tuple[set[str], bool]:
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if not o:
                continue
            if o in producer or o in defined:
                other = (
                    describe_node(nodes[producer[o]], producer[o])
                    if o in producer
                    else "a graph input or initializer"
                )
                raise InvalidModelError(
                    f"{where}: value '{o}'{ctx} is defined twice ({other} and {describe_node(n, i)}); ONNX values have "
                    "one definition: rename one"
                )
            producer[o] = i
    visible = defined | set(producer) | outer
    free: set[str] = set()
    deps: list[set[int]] = []
    subgraphs_unsorted = False
    for i, n in enumerate(nodes):
        needed = [x for x in n.input if x]
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                used, sub_unsorted = _check_graph(
                    sub, visible, f" in a subgraph of {describe_node(n, i)}{ctx}", where, apply
                )
                needed.extend(sorted(used))
                subgraphs_unsorted |= sub_unsorted
        mine = set()
        for x in needed:
            if x in producer:
                mine.add(producer[x])
            elif x in defined:
                continue
            elif x in outer:
                free.add(x)
            else:
                raise InvalidModelError(
                    f"{where}: {describe_node(n, i)}{ctx} reads '{x}', which is not a graph input, initializer or "
                    "output of any node" + (" (nor a value of an enclosing graph)" if ctx else "")
                )
        deps.append(mine)
    order = _topological_order(nodes, deps, ctx, where)
    unsorted = order != list(range(len(nodes)))
    if unsorted and apply:
        ordered = []
        for i in order:
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[i])
            ordered.append(copy)
        del nodes[:]
        nodes.extend(ordered)
    return free, unsorted or subgraphs_unsorted


def _topological_order(
    nodes: Sequence[onnx.NodeProto], deps: list[set[int]], ctx: str, where: str
) -> list[int]:
    """Kahn's algorithm, stable (a sorted graph keeps its order); refuses a cycle, naming it."""
    users: list[list[int]] = [[] for _ in nodes]
    missing = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        left = sorted(set(range(len(nodes))) - set(order))
        cycle = _a_cycle(left, deps)
        if len(cycle) == 2:
            raise InvalidModelError(
                f"{where}: {describe_node(nodes[cycle[0]], cycle[0])}{ctx} reads its own output; "
                "ONNX graphs must be acyclic"
            )
        names = " -> ".join(describe_node(nodes[i], i) for i in cycle)
        raise InvalidModelError(f"{where}: nodes{ctx} form a cycle: {names}; ONNX graphs must be acyclic")
    return order


def _a_cycle(left: list[int], deps: list[set[int]]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm could not order (first node repeated at the end)."""
    rest = set(left)
    i = left[0]
    path: list[int] = []
    seen: dict[int, int] = {}
    while i not in seen:
        seen[i] = len(path)
        path.append(i)
        i = min(j for j in deps[i] if j in rest)  # a node left over always waits for another one
    return [*path[seen[i] :], i]
