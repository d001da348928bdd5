"""LoRA without a rebuild: merge a LoRA file into an artifact's stored weights when they are loaded.

Torch-free (numpy and the standard library), so it runs on the device. A LoRA adds ``scale * alpha / rank *
up @ down`` to the weight of each layer it names; the artifact keeps its weights in ``weights.bin`` apart
from the compiled library, so merging is a matter of changing the tensors handed to ``main``:

- file: ``.safetensors`` read by :func:`read_safetensors` (8-byte header length, JSON header, raw data);
- key naming: diffusers/PEFT (``unet.<module>.lora_A.weight`` / ``lora_B``), older diffusers
  (``<module>.lora.down.weight`` / ``up``, ``<attn>.processor.to_q_lora.down.weight``) and kohya
  (``lora_unet_<module with _>.lora_down.weight`` / ``lora_up`` / ``alpha``); linear and conv (1x1 and
  kxk) layers;
- stored transforms: the compiler stores some weights precomputed (``lift-weight-transforms``: a Linear
  weight as its transpose ``W:transpose``, a bias as ``b:reshape``). The merge happens in the stored space,
  which is exact for the transforms that only move or cast elements: reshapes, casts and the transpose of a
  2-D weight (``(W + D)^T = W^T + D^T``). Any other precomputed transform (a Winograd weight transform)
  would have to be re-run by the compiler, so such layers are refused with a message saying how to compile
  without it;
- quantized layers (``precision=`` at compile time: int8 ``w8``/``w8a8``, int4 ``w4``): the stored integers
  are dequantized, the delta added, and the result quantized again with the layer's format by the same
  numpy quantizer the compiler used (``runtime/quantize.py``);
- changing or removing a LoRA restores the touched tensors from ``weights.bin`` first (an exact reload, not
  a subtraction that would accumulate rounding and re-quantization error).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import EdgediffError
from edgediff.runtime.layouts import from_stored_layout, to_stored_layout


class LoraError(EdgediffError):
    """A LoRA file that cannot be read or does not fit the artifact it is merged into."""


# safetensors dtype codes -> numpy (BF16 has no numpy dtype: widened to float32 by bit shifting)
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit on the JSON header
# The kernels of lift-weight-transforms whose effect the merge can apply in the stored space (see above).
MOVE_KERNELS = ("reshape", "transpose", "astype", "cast")
UNMATCHED_SHOWN = 8


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as a numpy array (float16/32/64, ints; bf16 as float32)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            (header_bytes,) = struct.unpack("<Q", handle.read(8))
            if header_bytes > MAX_HEADER_BYTES:
                raise LoraError(f"{path}: not a safetensors file (header of {header_bytes} bytes)")
            header = json.loads(handle.read(header_bytes))
            data = handle.read()
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"cannot read LoRA file '{path}': {err}") from err
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
        if entry["dtype"] == "BF16":
            array = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif entry["dtype"] in _SAFETENSORS_DTYPES:
            array = raw.view(np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<"))
        else:
            raise LoraError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        tensors[name] = array.reshape(entry["shape"]).copy()
    return tensors


# ------------------------------------------------------------------------------------------------ parsing

# (pattern, part): one LoRA tensor key -> the layer it belongs to and which matrix it is
_KEY_PATTERNS = (
    (re.compile(r"^(?P<layer>.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(?P<layer>.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(?P<layer>.+)\.alpha$"), "alpha"),
)
# Older diffusers attention-processor LoRAs: attn1.processor.to_q_lora -> attn1.to_q (to_out -> to_out.0)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# Which model a key prefix belongs to, for the artifact set's roles.
ROLE_PREFIXES = (
    ("denoiser", ("unet.", "transformer.", "lora_unet_", "lora_transformer_")),
    ("text_encoder", ("text_encoder.", "lora_te_", "lora_te1_")),
)


@dataclass
class LoraLayer:
    """One layer of a LoRA: ``delta = alpha / rank * up @ down`` (reshaped to the weight's shape)."""

    key: str  # the layer as the file names it (prefix included)
    role: str
    path: str  # module path with the role prefix removed: dots (diffusers) or underscores (kohya)
    kohya: bool
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        assert self.down is not None
        return int(self.down.shape[0])

    def delta(self, weight_shape: tuple[int, ...]) -> np.ndarray:
        """``alpha / rank * up @ down`` in float32, shaped as the weight (linear: (out, in); conv: (out, in,
        kh, kw), where ``down`` carries the kernel and ``up`` is 1x1)."""
        assert self.down is not None and self.up is not None
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32).reshape(self.down.shape[0], -1)
        if up.shape[1] != down.shape[0]:
            raise LoraError(
                f"LoRA layer '{self.key}': up {list(self.up.shape)} and down "
                f"{list(self.down.shape)} have different ranks"
            )
        product = up @ down
        if product.size != int(np.prod(weight_shape)) or product.shape[0] != weight_shape[0]:
            raise LoraError(
                f"LoRA layer '{self.key}' changes a weight of shape "
                f"{[product.shape[0], *self.down.shape[1:]]}, but the artifact's layer has shape "
                f"{list(weight_shape)}: the LoRA was made for another base model"
            )
        factor = (self.alpha / self.rank) if self.alpha is not None else 1.0
        return (factor * product).reshape(weight_shape)


def _role_and_path(layer_key: str) -> tuple[str, str, bool]:
    for role, prefixes in ROLE_PREFIXES:
        for prefix in prefixes:
            if layer_key.startswith(prefix):
                return role, layer_key[len(prefix) :], prefix.startswith("lora_")
    return "denoiser", layer_key, False  # an unprefixed file is for the denoiser


def parse_lora(tensors: Mapping[str, np.ndarray], source: str = "LoRA") -> list[LoraLayer]:
    """The layers of a LoRA state dict in any of the supported namings (see the module docstring)."""
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, value in tensors.items():
        found = next(((m, part) for pattern, part in _KEY_PATTERNS if (m := pattern.match(key))), None)
        if found is None:
            unknown.append(key)
            continue
        match, part = found
        layer_key = _PROCESSOR.sub(
            lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), match["layer"]
        )
        if layer_key not in layers:
            role, path, kohya = _role_and_path(layer_key)
            layers[layer_key] = LoraLayer(layer_key, role, path, kohya)
        if part == "alpha":
            layers[layer_key].alpha = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            setattr(layers[layer_key], part, value)
    if unknown:
        raise LoraError(
            f"{source}: {len(unknown)} keys are not LoRA matrices in a known naming (diffusers "
            "lora_A/lora_B, lora.down/lora.up, kohya lora_down/lora_up/alpha): "
            + ", ".join(unknown[:UNMATCHED_SHOWN])
        )
    incomplete = [k for k, layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise LoraError(
            f"{source}: layers without both down and up matrices: " + ", ".join(incomplete[:UNMATCHED_SHOWN])
        )
    if not layers:
        raise LoraError(f"{source}: no LoRA layers in the file")
    return list(layers.values())


@dataclass
class Lora:
    """A LoRA file read and parsed, with the scale it is merged at."""

    path: str
    layers: list[LoraLayer]
    scale: float = 1.0

    @classmethod
    def load(cls, path: str | os.PathLike, scale: float = 1.0) -> Lora:
        return cls(str(path), parse_lora(read_safetensors(path), str(path)), float(scale))

    def for_role(self, role: str) -> list[LoraLayer]:
        return [layer for layer in self.layers if layer.role == role]

    def roles(self) -> list[str]:
        return sorted({layer.role for layer in self.layers})


# ----------------------------------------------------------------------------------- the artifact side


@dataclass
class StoredTensor:
    """One tensor of weights.bin and how it was made from the model's weight ``source``."""

    index: int
    source: str
    kernels: list[str]  # the precomputed transform (empty: stored as the model has it)
    shape: tuple[int, ...]
    dtype: str
    layout: dict[str, Any] | None = None  # a kernel's layout the weight is stored in (runtime/layouts.py)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class MergeTarget:
    """Where one LoRA layer goes: the artifact's weight, its stored tensors, and its precision format."""

    layer: LoraLayer
    weight: str  # source weight name in the artifact (``unet.down_blocks.0....to_q.weight``)
    weight_shape: tuple[int, ...]
    stored: list[StoredTensor]  # the weight's tensors (several when it is stored more than once)
    scales: list[StoredTensor] = field(default_factory=list)  # quantized: the scale tensors
    format: str | None = None  # the precision plan's format, None for float layers


def stored_tensors(manifest: Mapping[str, Any]) -> list[StoredTensor]:
    """Each weights.bin tensor's source weight and transform kernels, from the manifest."""
    chains = manifest["weights"].get("transforms") or {}
    layouts = manifest["weights"].get("layouts") or {}
    out = []
    for entry in manifest["weights"]["tensors"]:
        name = entry["name"]
        source, _, kernel = name.partition(":")
        kernel = kernel.split("#")[0]
        kernels = list(chains.get(name, [kernel] if kernel else []))
        shape = tuple(entry["shape"])
        out.append(StoredTensor(entry["index"], source, kernels, shape, entry["dtype"], layouts.get(source)))
    return out


def precision_plan(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The mixed-precision plan's layers by weight name (empty for a float artifact)."""
    for item in manifest.get("passes", []):
        if item["name"] == "mixed-precision":
            plan = item["report"].get("plan") or {}
            return {layer["weight"]: layer for layer in plan.get("layers", []) if layer.get("weight")}
    return {}


SCALE_SUFFIX = "_scale"  # as passes/mixed_precision.py names a quantized weight's scale


def _source_shape(tensor: StoredTensor) -> tuple[int, ...] | None:
    """The shape of the model's weight behind a float stored tensor, when the stored one determines it."""
    if tensor.layout is not None and tensor.layout.get("layout") == "column_panels":
        count, depth, panel = tensor.shape[-3:]
        columns = int(tensor.layout["groups"]) * count * panel
        return (columns, depth) if tensor.layout["transposed"] else (depth, columns)
    if not tensor.kernels:
        return tensor.shape
    if "transpose" in tensor.kernels and len(tensor.shape) == 2:
        return tensor.shape[::-1]
    return None


def _rank(tensor: StoredTensor) -> int:
    """The rank of the model's weight behind a stored tensor (the stored rank when it cannot tell)."""
    return len(_source_shape(tensor) or tensor.shape)


def _refusal(tensor: StoredTensor) -> str | None:
    """Why a stored tensor cannot take a merge in the stored space (None: it can)."""
    odd = [k for k in tensor.kernels if k not in MOVE_KERNELS]
    if "+" in tensor.source:
        return f"stored as '{tensor.source}:{tensor.kernels[-1]}', computed from several weights"
    if odd:
        hint = " (compile with --disable-pass winograd-conv2d)" if any("winograd" in k for k in odd) else ""
        return f"stored precomputed by the '{odd[-1]}' kernel, which the runtime cannot re-run{hint}"
    if tensor.layout is not None:  # the manifest says exactly how it was laid out
        known = tensor.layout.get("layout") == "column_panels"
        return None if known else f"stored in the unknown layout {tensor.layout.get('layout')!r}"
    if tensor.kernels.count("transpose") > 1 or ("transpose" in tensor.kernels and len(tensor.shape) != 2):
        return f"stored as a {len(tensor.shape)}-D transpose, whose axes the manifest does not record"
    return None


def to_stored(array: np.ndarray, tensor: StoredTensor) -> np.ndarray:
    """A model-space array (a delta or a re-quantized weight) in ``tensor``'s stored layout and dtype."""
    if tensor.layout is not None:
        return to_stored_layout(array, tensor.layout).reshape(tensor.shape)
    if "transpose" in tensor.kernels:
        array = array.reshape(tensor.shape[1], tensor.shape[0]).T
    return np.ascontiguousarray(array.reshape(tensor.shape))


def from_stored(array: np.ndarray, tensor: StoredTensor, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`to_stored`: ``tensor``'s stored array as the model's array of ``shape``."""
    if tensor.layout is not None:
        return from_stored_layout(array, tensor.layout, shape)
    if "transpose" in tensor.kernels:
        array = array.T
    return np.ascontiguousarray(array).reshape(shape)


def _module_names(weights: list[str]) -> dict[str, str]:
    """Weight name by module path (``unet.down_blocks.0....to_q``) for every ``<module>.weight``."""
    return {name[: -len(".weight")]: name for name in weights if name.endswith(".weight")}


def _find_module(layer: LoraLayer, modules: dict[str, str], underscored: dict[str, str]) -> str | None:
    """The artifact module a LoRA layer names: the same dotted path, or (kohya) the path with dots as
    underscores, after any prefix the artifact adds (``unet.`` from the zoo wrapper)."""
    if layer.kohya:
        key = layer.path
        hits = [m for u, m in underscored.items() if u == key or u.endswith("_" + key)]
    else:
        hits = [m for m in modules if m == layer.path or m.endswith("." + layer.path)]
    return min(hits, key=len) if hits else None


def plan_merge(manifest: Mapping[str, Any], layers: list[LoraLayer], where: str) -> list[MergeTarget]:
    """Match LoRA layers to the artifact's weights; raise :class:`LoraError` for layers that match nothing,
    whose shapes disagree (another base model), or whose stored form cannot take a merge."""
    tensors = stored_tensors(manifest)
    plan = precision_plan(manifest)
    by_source: dict[str, list[StoredTensor]] = {}
    for tensor in tensors:
        by_source.setdefault(tensor.source, []).append(tensor)
    modules = _module_names(list(by_source) + [w for w in plan if w not in by_source])
    underscored = {m.replace(".", "_"): m for m in modules}
    targets, unmatched = [], []
    for layer in layers:
        module = _find_module(layer, modules, underscored)
        if module is None:
            unmatched.append(layer.key)
            continue
        weight = modules[module]
        quant = plan.get(weight)
        fmt = quant["format"] if quant and _requantizes(quant["format"]) else None
        stored = by_source.get(weight, [])
        for tensor in stored:
            reason = _refusal(tensor)
            if reason:
                raise LoraError(f"{where}: cannot merge LoRA layer '{layer.key}' into '{weight}': {reason}")
        if quant:
            shape = tuple(quant["weight_shape"])
        else:
            shapes = {_source_shape(t) for t in stored} - {None}
            if not shapes and stored:  # reshaped only: the LoRA's own shape, if it has as many elements
                shapes = {_lora_shape(layer)} if stored[0].size == int(np.prod(_lora_shape(layer))) else set()
            if len(shapes) != 1:
                raise LoraError(f"{where}: cannot tell the shape of '{weight}' from its stored form")
            (shape,) = shapes
        rows = (shape[0], int(np.prod(shape[1:])))
        for tensor in stored if not fmt else []:
            if "transpose" in tensor.kernels and tensor.layout is None and tensor.shape[::-1] != rows:
                raise LoraError(
                    f"{where}: cannot merge LoRA layer '{layer.key}' into '{weight}': stored transposed as "
                    f"{list(tensor.shape)}, not as the transpose of {list(rows)}"
                )
        scales = by_source.get(weight + SCALE_SUFFIX, []) if fmt else []
        for tensor in scales:
            reason = _refusal(tensor)
            if reason:
                raise LoraError(f"{where}: cannot merge LoRA layer '{layer.key}' into '{weight}': {reason}")
        targets.append(MergeTarget(layer, weight, shape, stored, scales, fmt))
    if unmatched:
        raise LoraError(
            f"{where}: {len(unmatched)} of {len(layers)} LoRA layers match no layer of the model "
            f"(first: {', '.join(unmatched[:UNMATCHED_SHOWN])})"
        )
    for target in targets:
        _check_shape(target)
    return targets


def _lora_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The weight shape a LoRA layer's product has: (out, in) or (out, in, kh, kw)."""
    assert layer.down is not None and layer.up is not None
    return (int(layer.up.shape[0]), *(int(d) for d in layer.down.shape[1:]))


def _check_shape(target: MergeTarget) -> None:
    """A LoRA for another base model: its product does not have the weight's shape (named in the error)."""
    layer, shape = target.layer, target.weight_shape
    assert layer.down is not None and layer.up is not None
    made = list(_lora_shape(layer))
    if made[0] != shape[0] or int(np.prod(made[1:])) != int(np.prod(shape[1:])):
        raise LoraError(
            f"LoRA layer '{layer.key}' is for a weight of shape {made}, but '{target.weight}' has shape "
            f"{list(shape)}: the LoRA was made for another base model"
        )


def merged_tensors(targets: list[MergeTarget], scale: float, read: Any) -> dict[int, np.ndarray]:
    """The new stored tensors (by weights.bin index) with every target's LoRA merged at ``scale``.

    ``read(index)`` gives a stored tensor as the artifact has it (the un-merged original)."""
    out: dict[int, np.ndarray] = {}
    for target in targets:
        delta = scale * target.layer.delta(target.weight_shape)
        if target.format is None:
            for tensor in target.stored:
                base = out[tensor.index] if tensor.index in out else read(tensor.index)
                merged = base.astype(np.float32) + to_stored(delta, tensor)
                out[tensor.index] = merged.astype(tensor.dtype)
            continue
        out.update(_requantized(target, delta, read))
    return out


def _requantizes(fmt: str) -> bool:
    """Whether a layer at format ``fmt`` stores integers and scales that a merge re-quantizes; float formats
    (fp32, fp16, fp16-acc16, bf16) store the weight itself, which takes the delta in place."""
    from edgediff.runtime import quantize as q

    return q.get_format(fmt).weight_bits not in (16, 32)


def _requantized(target: MergeTarget, delta: np.ndarray, read: Any) -> dict[int, np.ndarray]:
    """A quantized layer: dequantize the stored integers, add the delta, quantize again with the plan's
    format (the compiler's own numpy quantizer), and store both the integers and the scales."""
    from edgediff.runtime import quantize as q

    fmt = q.get_format(str(target.format))
    shapes = q.stored_shapes(target.weight_shape, fmt)
    ints, scale = target.stored[0], target.scales[0]
    int_values = from_stored(read(ints.index), ints, shapes[0])
    scale_values = from_stored(read(scale.index), scale, shapes[1])
    weight = q.dequantize(int_values, scale_values, target.weight_shape, fmt)
    stored = q.quantize_weight(weight + delta, fmt)
    out = {}
    for tensor in target.stored:
        out[tensor.index] = to_stored(stored[0], tensor).astype(tensor.dtype)
    for tensor in target.scales:
        out[tensor.index] = to_stored(stored[1], tensor).astype(tensor.dtype)
    return out


def mergeable_summary(manifest: Mapping[str, Any]) -> str:
    """What ``edgediff inspect`` says about LoRA: how many layers can take one at load time."""
    tensors = stored_tensors(manifest)
    plan = precision_plan(manifest)
    weights = {t.source for t in tensors if t.source.endswith(".weight") and _rank(t) in (2, 4)}
    weights |= {w for w, layer in plan.items() if len(layer.get("weight_shape", [])) in (2, 4)}
    refused = {t.source for t in tensors if t.source in weights and _refusal(t)}
    quantized = {w for w, layer in plan.items() if _requantizes(layer["format"])}
    text = f"{len(weights) - len(refused)} linear/conv weights take a LoRA at load time (--lora)"
    if quantized:
        text += f", {len(quantized - refused)} of them re-quantized"
    if refused:
        text += f"; {len(refused)} refused (precomputed transforms, e.g. {sorted(refused)[0]})"
    return text
