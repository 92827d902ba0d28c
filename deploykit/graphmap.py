"""Map the nodes a runtime really executes (its optimised, fused graph) back to the original ONNX nodes.

Name matching breaks as soon as an optimiser renames nodes (ONNX Runtime's NCHWc pass names a fused
conv after its output tensor plus "_nchwc"). Tensors are steadier: a fused node still produces the
tensor the last of its source nodes produced. So each optimised node claims the original nodes lying
between its input tensors and its output tensors in the original graph.
"""
from __future__ import annotations

import onnx

# Element-wise ops runtimes fold into the producing kernel (activation and residual-add fusion).
_FUSABLE = frozenset({"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Add", "Sum", "Identity"})


def _to_original(name: str, original_tensors: set[str]) -> str | None:
    """The original tensor an optimised tensor stands for: itself, or the longest original name it extends."""
    if name in original_tensors:
        return name
    best = None
    for t in original_tensors:
        if name.startswith(t) and (best is None or len(t) > len(best)):
            best = t
    return best


def map_source_nodes(original: onnx.ModelProto, optimised_nodes: list[tuple[str, list[str], list[str]]]) -> dict[str, list[str]]:
    """For each optimised node (name, inputs, outputs): the original node names it covers, in graph order."""
    g = original.graph
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for o in n.output:
            if o:
                producer[o] = i
    tensors = set(producer) | {i.name for i in g.input} | {i.name for i in g.initializer}
    stop_always = {i.name for i in g.input} | {i.name for i in g.initializer}
    node_outputs = {n.name: [o for o in n.output if o] for n in g.node if n.name}
    cache: dict[str, str | None] = {}

    def by_node_name(name: str) -> str | None:
        """The output of the original node a renamed optimised node derives its name from: itself, or the
        longest original node name followed by "/" ("/act/Mul/QuickGeluFusion/" stands for "/act/Mul")."""
        if name in node_outputs:
            return (node_outputs[name] or [None])[0]
        best = None
        for n in node_outputs:
            if name.startswith(n + "/") and (best is None or len(n) > len(best)):
                best = n
        return (node_outputs[best] or [None])[0] if best else None

    def by_name(t: str) -> str | None:
        if t not in cache:
            cache[t] = _to_original(t, tensors) if t else None
        return cache[t]

    # Optimised tensors may be fresh names ("reorder_token_7"); then the node's own name, which the
    # optimiser derives from the original node or output it replaces, anchors its single output.
    anchor: dict[str, str] = {}
    named: list[str] = []
    graph_outputs = {o.name for o in g.output}
    inits = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    for name, _, outputs in optimised_nodes:
        mapped = [by_name(o) for o in outputs]
        if any(mapped):
            anchor.update({o: m for o, m in zip(outputs, mapped) if m})
        elif len(outputs) == 1:
            from_name = by_node_name(name) or by_name(name)
            if from_name:
                anchor[outputs[0]] = from_name
                named.append(outputs[0])
    # A name tells where a fused node starts, not where it ends (a conv that absorbed the residual Add
    # and ReLU after it): follow the single consumer through fusable element-wise ops while no other
    # optimised node stands for its output; through a binary op only when we take its other operand.
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    taken = set(anchor.values())
    for name, inputs, outputs in optimised_nodes:
        if not outputs or outputs[0] not in named:
            continue
        ours = {anchor.get(t) or by_name(t) for t in inputs}  # earlier nodes' anchors are final (topological order)
        t = anchor[outputs[0]]
        while len(consumers.get(t, [])) == 1:
            nd = g.node[consumers[t][0]]
            nxt = [o for o in nd.output if o]
            others = [u for u in nd.input if u and u != t and u not in inits]
            if (nd.op_type not in _FUSABLE or len(nxt) != 1 or nxt[0] in taken or nxt[0] in graph_outputs
                    or any(u not in ours for u in others)):
                break
            t = nxt[0]
        anchor[outputs[0]] = t
        taken.add(t)

    def orig(t: str) -> str | None:
        return anchor.get(t) or by_name(t)

    # Every original tensor some optimised node produces is a boundary between claims.
    boundaries = {orig(o) for _, _, outs in optimised_nodes for o in outs} - {None}
    result: dict[str, list[str]] = {}
    for name, inputs, outputs in optimised_nodes:
        stop = stop_always | {orig(t) for t in inputs} - {None}
        own = {orig(o) for o in outputs} - {None}
        claimed: set[int] = set()
        stack = list(own)
        while stack:
            t = stack.pop()
            if t in stop or t not in producer or producer[t] in claimed:
                continue
            idx = producer[t]
            claimed.add(idx)
            # Walk back until a tensor another optimised node produces: that node's claim starts there.
            stack.extend(u for u in g.node[idx].input if u and (u not in boundaries or u in own))
        result[name] = [g.node[i].name or f"{g.node[i].op_type}_{i}" for i in sorted(claimed)]
    return result
