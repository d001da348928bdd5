"""The op-level dataflow graph the NPU planner works on, read from a Relax module's ``main``.

The planner needs what each op is (conv2d, matmul, softmax, ...), its attributes and static shapes, and which
tensors are weights; a legalized module has lost the first (its kernels are TIR loops), so the graph is read
before ``legalize``. The graph is plain Python data (JSON-serialisable), so the NPU program can carry the ops
its tiles run and the simulator needs neither TVM nor torch.

Two rewrites make the graph what an NPU executes:

- weight-only computations (the fp16 casts and transposes of weights) are marked ``weight``: they run once
  at compile time (``lift-weight-transforms``) and their results are the weights the NPU streams from DRAM;
- each ``softmax(q @ k^T) @ v`` (with the casts, scale and -inf guard the importer emits around it) becomes
  one ``edgediff.attention`` node, which the planner tiles over query and key blocks with online softmax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Ops that only re-index their input: the NPU's DMA engine reads through them (strided, offset or
#: multi-source descriptors), so they move no bytes of their own in a tiled program.
VIEW_OPS = frozenset(
    {
        "relax.reshape",
        "relax.expand_dims",
        "relax.squeeze",
        "relax.flatten",
        "relax.broadcast_to",
        "relax.permute_dims",
        "relax.concat",
        "relax.split",
        "relax.strided_slice",
        "tuple_get",
    }
)
#: Views that are free in op-by-op execution too (TVM builds them as aliases); the others are kernels there.
ALIAS_OPS = frozenset({"relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten", "tuple_get"})
ELEMENTWISE_OPS = frozenset(
    {
        "relax.astype",
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.divide",
        "relax.power",
        "relax.maximum",
        "relax.minimum",
        "relax.sigmoid",
        "relax.nn.silu",
        "relax.nn.gelu",
        "relax.nn.gelu_tanh",
        "relax.nn.relu",
        "relax.tanh",
        "relax.exp",
        "relax.sqrt",
        "relax.rsqrt",
        "relax.negative",
        "relax.erf",
        "relax.clip",
        "relax.sin",
        "relax.cos",
        "relax.equal",
        "relax.logical_not",
        "relax.where",
        "relax.full_like",
    }
)
ATTENTION_OP = "edgediff.attention"
_BLOCK_RE = re.compile(
    r"(down_blocks_\d+|up_blocks_\d+|mid_block|transformer_blocks_\d+|blocks_\d+|layers_\d+)"
)


@dataclass
class Node:
    """One op call ``name = op(*args, **attrs)``; args are ``{"var": name}``, ``{"const": v, "dtype": d}``,
    ``{"shape": [...]}``, ``{"tuple": [args]}`` or ``{"value": v}``."""

    name: str
    op: str
    args: list[dict[str, Any]]
    attrs: dict[str, Any]
    shape: list[int] | None  # None for tuple-valued ops (split)
    dtype: str
    weight: bool = False  # computed from weights and constants alone (at compile time)
    layer: str = ""  # the weight (module path) the op belongs to, for reports and errors
    block: str = ""  # the model block (down_blocks_0, mid_block, ...)

    def var_args(self) -> list[str]:
        return list(_vars(self.args))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Tensor:
    name: str
    shape: list[int]
    dtype: str
    kind: str  # "input" | "weight"


@dataclass
class Graph:
    """Inputs, weights and nodes in execution order; ``output`` names the returned tensor."""

    inputs: list[Tensor]
    weights: list[Tensor]
    nodes: list[Node]
    output: str
    consumers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self.tensors = {t.name: t for t in self.inputs + self.weights}
        self.consumers = {}
        for node in self.nodes:
            for var in node.var_args():
                self.consumers.setdefault(var, []).append(node.name)

    def shape_of(self, name: str) -> list[int]:
        return self.tensors[name].shape if name in self.tensors else self.by_name[name].shape  # type: ignore

    def dtype_of(self, name: str) -> str:
        return self.tensors[name].dtype if name in self.tensors else self.by_name[name].dtype

    def is_weight(self, name: str) -> bool:
        tensor = self.tensors.get(name)
        return tensor.kind == "weight" if tensor is not None else self.by_name[name].weight

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.__dict__ for t in self.inputs],
            "weights": [t.__dict__ for t in self.weights],
            "nodes": [n.to_dict() for n in self.nodes],
            "output": self.output,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Graph:
        return cls(
            [Tensor(**t) for t in data["inputs"]],
            [Tensor(**t) for t in data["weights"]],
            [Node(**n) for n in data["nodes"]],
            data["output"],
        )


def _vars(args: list[dict[str, Any]]) -> Any:
    for arg in args:
        if "var" in arg:
            yield arg["var"]
        elif "tuple" in arg:
            yield from _vars(arg["tuple"])


def dtype_bytes(dtype: str) -> int:
    return 1 if dtype in ("bool", "int8", "uint8") else int(re.sub(r"\D", "", dtype) or 32) // 8


def nbytes(shape: list[int] | tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype_bytes(dtype)


def _py(value: Any) -> Any:
    """A TVM attribute value as plain JSON-able Python."""
    import tvm

    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tvm.tirx.IntImm):
        return int(value)
    if isinstance(value, tvm.tirx.FloatImm):
        return float(value)
    if hasattr(value, "__len__") and not isinstance(value, str) and not hasattr(value, "dtype"):
        return [_py(v) for v in value]
    text = str(value)
    return None if text in ("void", "") else text


def _attrs(attrs: Any) -> dict[str, Any]:
    if attrs is None:
        return {}
    info = getattr(type(attrs), "__tvm_ffi_type_info__", None)
    if info is None:
        return {}
    return {f.name: _py(getattr(attrs, f.name)) for f in info.fields}


def _arg(expr: Any, names: dict[Any, str]) -> dict[str, Any]:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        return {"var": names[expr]}
    if isinstance(expr, tvm.ir.StringImm):
        return {"value": expr.value}
    if isinstance(expr, tvm.ir.Constant):
        value = expr.value
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        return {"const": array.tolist(), "dtype": str(array.dtype)}
    if isinstance(expr, relax.ShapeExpr):
        return {"shape": [int(v) for v in expr.values]}
    if isinstance(expr, tvm.ir.Tuple):
        return {"tuple": [_arg(f, names) for f in expr.fields]}
    if isinstance(expr, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return {"value": _py(expr)}
    if hasattr(expr, "value"):
        return {"value": _py(expr.value)}
    raise ValueError(f"unsupported Relax argument {type(expr).__name__}")


def _tensor_type(ty: Any) -> tuple[list[int] | None, str]:
    from tvm import relax

    if isinstance(ty, relax.TensorType) and ty.shape is not None:
        return [int(v) for v in ty.shape.values], str(ty.dtype)
    return None, "tuple"


def from_relax(mod: Any, *, fuse_attention: bool = True) -> Graph:
    """Read ``mod["main"]`` (static shapes, before legalize) into a :class:`Graph`; ``fuse_attention=False``
    keeps the score tensors (the op-by-op baseline)."""
    import tvm
    from tvm import relax

    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    # Relax variables are objects; their name hints may repeat (the printer adds _1, _2): make them unique
    names: dict[Any, str] = {}
    used: set[str] = set()

    def name_of(var: Any) -> str:
        base = name = var.name
        suffix = 0
        while name in used:
            suffix += 1
            name = f"{base}_{suffix}"
        used.add(name)
        names[var] = name
        return name

    inputs, weights = [], []
    for index, param in enumerate(func.params):
        shape, dtype = _tensor_type(param.ty)
        kind = "input" if index < num_input else "weight"
        (inputs if index < num_input else weights).append(Tensor(name_of(param), shape or [], dtype, kind))
    nodes = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            shape, dtype = _tensor_type(binding.var.ty)
            if isinstance(value, relax.Call):
                args = [_arg(a, names) for a in value.args]
                node = Node("", value.op.name, args, _attrs(value.attrs), shape, dtype)
            elif isinstance(value, tvm.ir.TupleGetItem):
                args = [_arg(value.tuple_value, names)]
                node = Node("", "tuple_get", args, {"index": value.index}, shape, dtype)
            elif isinstance(value, tvm.ir.Constant):  # a constant bound to a variable
                node = Node("", "const", [_arg(value, names)], {}, shape, dtype, weight=True)
            elif isinstance(value, relax.Var):  # an alias binding
                node = Node("", "relax.reshape", [_arg(value, names), {"shape": shape}], {}, shape, dtype)
            else:
                raise ValueError(f"unsupported binding {type(value).__name__} for {binding.var.name}")
            node.name = name_of(binding.var)
            nodes.append(node)
    body = func.body.body
    if not isinstance(body, relax.Var):
        raise ValueError("main must return one tensor variable")
    body_name = names[body]
    graph = Graph(inputs, weights, nodes, body_name)
    _mark_weights(graph)
    _label_layers(graph)
    if fuse_attention:
        _fuse_attention(graph)
    return graph


def _mark_weights(graph: Graph) -> None:
    for node in graph.nodes:
        args = node.var_args()
        node.weight = node.op == "const" or (bool(args) and all(graph.is_weight(a) for a in args))


# Ops allowed on the path from q @ k^T to softmax and from softmax to the P @ v matmul (casts, the 1/sqrt(d)
# scale, reshapes, and the importer's guard that zeroes rows that are all -inf).
_SCORE_PATH = (
    frozenset({"relax.astype", "relax.multiply", "relax.divide"}) | ALIAS_OPS | {"relax.broadcast_to"}
)
_GUARD_OPS = frozenset(
    {"relax.equal", "relax.logical_not", "relax.max", "relax.full_like", "relax.where", "relax.astype"}
)


def _fuse_attention(graph: Graph) -> None:
    """Replace each softmax(q @ k^T * scale) @ v subgraph by one ``edgediff.attention`` node."""
    removed: set[str] = set()
    replacements: dict[str, Node] = {}
    for softmax in [n for n in graph.nodes if n.op == "relax.nn.softmax"]:
        if softmax.attrs.get("axis", -1) not in (-1, len(softmax.shape or []) - 1):
            continue
        # back to the q @ k^T matmul
        scale, path, cur = 1.0, [], graph.by_name.get(softmax.var_args()[0])
        while cur is not None and cur.op in _SCORE_PATH:
            path.append(cur)
            if cur.op in ("relax.multiply", "relax.divide"):
                consts = [a for a in cur.args if "const" in a]
                if len(consts) != 1 or np.size(consts[0]["const"]) != 1:
                    cur = None
                    break
                value = float(np.asarray(consts[0]["const"]))
                scale *= value if cur.op == "relax.multiply" else 1.0 / value
            cur = graph.by_name.get(cur.var_args()[0])
        if cur is None or cur.op != "relax.matmul" or len(cur.shape or []) != 3:
            continue
        qk = cur
        # forward to the P @ v matmul: the nodes reachable from softmax until a matmul
        region, frontier, pv = {softmax.name}, [softmax.name], None
        while frontier:
            for consumer in graph.consumers.get(frontier.pop(), []):
                node = graph.by_name[consumer]
                if node.op == "relax.matmul":
                    if pv is not None and pv.name != node.name:
                        pv = None
                        frontier = []
                        break
                    pv = node
                elif node.op in _SCORE_PATH | _GUARD_OPS and consumer not in region:
                    region.add(consumer)
                    frontier.append(consumer)
        if pv is None or len(pv.shape or []) != 3 or pv.var_args()[0] not in region:
            continue
        # the guard reads the scores too; collect every node between qk and pv
        inner = {p.name for p in path} | region
        for node in graph.nodes:
            if node.name not in inner and any(a in inner for a in node.var_args()) and node is not pv:
                if node.op in _GUARD_OPS:
                    inner.add(node.name)
        escapes = [
            c
            for n in inner | {qk.name}
            for c in graph.consumers.get(n, [])
            if c not in inner and c != pv.name
        ]
        if escapes:
            continue
        q, kt = qk.var_args()[0], qk.var_args()[1]
        score_dtype = next((p.attrs.get("dtype") for p in path if p.op == "relax.astype"), None)
        prob_dtype = graph.dtype_of(pv.var_args()[0])
        replacements[pv.name] = Node(
            pv.name,
            ATTENTION_OP,
            [{"var": q}, {"var": kt}, pv.args[1]],
            {"scale": scale, "score_dtype": score_dtype, "prob_dtype": prob_dtype, "out_dtype": pv.dtype},
            pv.shape,
            pv.dtype,
            layer=pv.layer,
            block=pv.block,
        )
        removed |= inner | {qk.name}
    if replacements:
        graph.nodes = [replacements.get(n.name, n) for n in graph.nodes if n.name not in removed]
        graph.__post_init__()


def _label_layers(graph: Graph) -> None:
    """Name each op after the weight it uses (else its producer's), and the model block that weight is in."""
    origin: dict[str, str] = {w.name: w.name for w in graph.weights}
    layer = ""
    for node in graph.nodes:
        weights = [origin.get(a, "") for a in node.var_args() if graph.is_weight(a)]
        if node.weight:
            origin[node.name] = weights[0] if weights else ""
            continue
        named = [w for w in weights if w]
        if named:
            layer = _layer_name(named[0])
        node.layer = layer
        match = _BLOCK_RE.search(layer)
        parts = layer.split("_")
        node.block = (
            match.group(0) if match else ("_".join(parts[1:3]) if len(parts) > 2 else layer or "input")
        )


def _layer_name(weight: str) -> str:
    name = re.sub(r"^p_", "", weight)
    return re.sub(r"_(weight|bias)$", "", name)
