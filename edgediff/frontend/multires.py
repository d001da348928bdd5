"""Several resolutions in one artifact: one entry function per resolution, one copy of the weights.

``compile_model(..., resolutions=[(512, 512), (768, 512)])`` captures the model once per resolution, runs
the pass pipeline on each graph (so every kernel is scheduled for its own static shapes, as in a build for
that resolution alone) and merges the results into one module: the first resolution's entry stays ``main``
(what single-resolution artifacts have), the others are ``main_<height>x<width>``. All entries take the
same weights in the same order, so ``weights.bin`` holds them once; the library grows by the code of the
extra entries only, and kernels that are the same at every resolution (the time embedding, the text
projections) are kept once.

Why static entries rather than one entry with symbolic height and width: the schedule rules
(``schedules/``) take their tile sizes from the cost model for each kernel's static extents, and
the Winograd rewrite and the fused attention need static shapes; a symbolic kernel loses both, so it could
not stay within 10% of a build specialised for one resolution. Enumerated shapes keep that speed for the
resolutions a deployment needs, and code is the cheap part of an artifact.

Compile-time weight transforms must agree across entries to share storage: the Winograd choice is made
once, for the largest resolution (its layers are the ones where Winograd pays), and forced on the others;
any other transformed weight that would differ between entries is an error rather than a silent second
copy.

Resolutions are ``(height, width)`` in pixels, written ``HEIGHTxWIDTH`` on the command line; the latent
is the pixel size divided by the model's VAE scale factor (8 for SD and DiT).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from edgediff.errors import BuildError, InputError

Resolution = tuple[int, int]  # (height, width) in pixels
RESOLUTION_TEXT = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_resolution(value: Any) -> Resolution:
    """``"768x512"`` (height x width), ``(768, 512)`` or ``512`` (square) as ``(height, width)``."""
    if isinstance(value, str):
        match = RESOLUTION_TEXT.match(value)
        if match is None:
            if value.strip().isdigit():
                return parse_resolution(int(value))
            raise InputError(f"resolution '{value}' is not HEIGHTxWIDTH (e.g. 768x512)")
        return parse_resolution((int(match.group(1)), int(match.group(2))))
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_resolution((value, value))
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        height, width = int(value[0]), int(value[1])
        if height < 1 or width < 1:
            raise InputError(f"resolution {height}x{width} must be positive")
        return height, width
    raise InputError(f"resolution {value!r} is not (height, width) or 'HEIGHTxWIDTH'")


def parse_resolutions(value: Any) -> list[Resolution]:
    """A list of resolutions from ``"512x512,768x512"`` or an iterable; duplicates dropped, order kept (the
    first is the artifact's default entry)."""
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        items = [value]  # one (height, width) pair
    resolutions = list(dict.fromkeys(parse_resolution(item) for item in items))
    if not resolutions:
        raise InputError("resolutions: give at least one HEIGHTxWIDTH")
    return resolutions


def format_resolution(resolution: Sequence[int]) -> str:
    return f"{resolution[0]}x{resolution[1]}"


def entry_name(index: int, resolution: Resolution | None) -> str:
    """The entry function of one resolution: the first (default) is ``main``, the others
    ``main_<height>x<width>``."""
    return "main" if index == 0 or resolution is None else f"main_{format_resolution(resolution)}"


# --- capture ---------------------------------------------------------------------------------------------


def resolve_zoo_model(model: Any, *, batch: int | None) -> Any:
    """``model`` (zoo name, diffusers folder or ZooModel) as a ZooModel: resolutions need the model's VAE
    scale factor, which only those know."""
    from edgediff import zoo

    options = {"batch": batch} if batch is not None else {}
    if isinstance(model, zoo.ZooModel):
        if options:
            raise InputError("batch only applies to zoo names and diffusers folders, not to a ZooModel")
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if text.lower().endswith(".onnx"):
            raise InputError("resolutions apply to zoo models and diffusers folders, not to an ONNX file")
        if os.path.isdir(text):
            return zoo.load_local(text, **options)
        return zoo.build(text, **options)
    raise InputError(
        f"resolutions apply to zoo models and diffusers folders, not to a {type(model).__name__}: wrap a "
        "diffusers model with edgediff.zoo.wrap(), or compile one build per example input shape"
    )


def latent_of(zm: Any, resolution: Resolution) -> tuple[int, int]:
    """The latent (height, width) of a pixel resolution, checked against the VAE scale and patch size."""
    if zm.family == "text-encoder":
        raise InputError(f"{zm.name} is a text encoder: it has no resolution (compile it without one)")
    scale = int(zm.meta["vae_scale_factor"])
    patch = int((zm.config or {}).get("patch_size") or 1)
    step = scale * patch
    height, width = resolution
    if height % step or width % step:
        raise InputError(
            f"{zm.name}: resolution {format_resolution(resolution)} is not a multiple of {step} "
            f"(VAE scale {scale}" + (f" x patch size {patch})" if patch > 1 else ")")
        )
    if zm.family == "dit" and height != width:
        # DiTTransformer2DModel unpatchifies with height = width = sqrt(tokens); its sin-cos position
        # embedding is recomputed for any size, so square sizes other than the native one do work
        raise InputError(
            f"{zm.name}: DiT takes square resolutions only (diffusers' DiT unpatchifies to a square), "
            f"got {format_resolution(resolution)}"
        )
    return height // scale, width // scale


def resolution_inputs(zm: Any, resolution: Resolution, seed: int = 0) -> tuple[Any, ...]:
    """The ZooModel's example inputs with the latent (its first input) at ``resolution``; the other inputs
    (timestep, text embeddings, SDXL time ids) do not depend on the image size's shape."""
    import torch

    latent_h, latent_w = latent_of(zm, resolution)
    sample = zm.example_inputs[0]
    gen = torch.Generator().manual_seed(seed)
    resized = torch.randn(sample.shape[0], sample.shape[1], latent_h, latent_w, generator=gen)
    return (resized.to(sample.dtype), *zm.example_inputs[1:])


def capture_resolutions(
    model: Any,
    resolutions: list[Resolution],
    *,
    input_names: Sequence[str] | None = None,
    name: str | None = None,
    batch: int | None = None,
) -> list[Any]:
    """One captured graph per resolution, all from the same module (so the same weights)."""
    from edgediff.frontend.capture import capture

    zm = resolve_zoo_model(model, batch=batch)
    for resolution in resolutions:  # every size checked before the first (slow) capture
        latent_of(zm, resolution)
    captured = []
    for resolution in resolutions:
        inputs = resolution_inputs(zm, resolution)
        one = capture(zm, inputs, input_names=input_names, name=name)
        latent_h, latent_w = inputs[0].shape[-2:]
        # the artifact's meta describes its default (first) entry, as a single-resolution build's would
        one.meta.update(
            latent_size=latent_h if latent_h == latent_w else [latent_h, latent_w],
            image_size=resolution[0] if resolution[0] == resolution[1] else list(resolution),
        )
        captured.append(one)
    return captured


# --- weights ---------------------------------------------------------------------------------------------


def share_weights(imported: list[Any]) -> dict[str, Any]:
    """The imported weights by name, one copy each: every capture read the same module, so a name means
    the same tensor in every entry (a buffer only some resolutions read, like DiT's positional embedding at
    its native size, is there once too). Later imports' copies are dropped."""
    by_name: dict[str, Any] = {}
    for model in imported:
        for weight_name, array in zip(model.weight_names, model.weights, strict=True):
            known = by_name.setdefault(weight_name, array)
            if tuple(known.shape) != tuple(array.shape) or str(known.dtype) != str(array.dtype):
                raise BuildError(
                    f"weight '{weight_name}' is {list(array.shape)} {array.dtype} at one resolution and "
                    f"{list(known.shape)} {known.dtype} at another: it cannot be shared"
                )
        model.weights = [by_name[n] for n in model.weight_names]
    return by_name


def decision_order(resolutions: list[Resolution]) -> list[int]:
    """Entries in the order their passes run: the largest resolution first, which decides the per-layer
    choices (Winograd) the others then take."""
    return sorted(range(len(resolutions)), key=lambda i: -resolutions[i][0] * resolutions[i][1])


def winograd_plan(results: list[Any]) -> list[str] | None:
    """The per-layer Winograd variants a ``winograd-conv2d`` run chose (program order), if it ran."""
    from edgediff.passes.report import find_report
    from edgediff.passes.winograd_conv2d import WinogradConv2dReport

    report = find_report(results, WinogradConv2dReport)
    return report.chosen() if report is not None else None


def plan_at(plan: Any, calibrated: Sequence[int], latent: Sequence[int]) -> Any:
    """A precision plan measured at the ``calibrated`` latent size (height, width), for ``latent``.

    Formats and scales stay (the weights, hence their formats, are shared; activation ranges are taken as
    the calibrated size's); only the attention layers' token counts, by which the mixed-precision rewrite
    finds them, scale with the latent area: queries always, keys in self-attention (as many as queries)."""
    from fractions import Fraction

    ratio = Fraction(int(latent[0]) * int(latent[1]), int(calibrated[0]) * int(calibrated[1]))
    if plan is None or ratio == 1:
        return plan
    layers = []
    for layer in plan.layers:
        if layer.kind == "attention" and layer.attention_shape:
            heads, queries, keys, dim = layer.attention_shape
            scaled = queries * ratio
            if scaled.denominator == 1:  # else left as is: the rewrite then names the layer it cannot find
                keys = int(scaled) if keys == queries else keys
                layer = dataclasses.replace(layer, attention_shape=[heads, int(scaled), keys, dim])
        layers.append(layer)
    return dataclasses.replace(plan, layers=layers)


@dataclass
class LoweredEntry:
    """One resolution after the passes: its module and the weights its ``main`` takes (arrays + names)."""

    function: str
    resolution: Resolution | None  # None: an ordinary single-shape build
    mod: Any
    weights: list[Any]
    weight_names: list[str]


def merge_entries(entries: list[LoweredEntry]) -> tuple[Any, list[Any], list[str]]:
    """One module with an entry function per resolution, and the weights every entry takes (union, in first
    appearance order). Kernels equal in every way but their name are kept once; others get a suffix."""
    import tvm_ffi
    from tvm import relax, tirx

    if len(entries) == 1:
        entry = entries[0]
        return entry.mod, entry.weights, entry.weight_names

    names: list[str] = []
    arrays: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for entry in entries:
        main = entry.mod["main"]
        num_input = int(main.attrs["num_input"])
        for weight_name, param, array in zip(
            entry.weight_names, main.params[num_input:], entry.weights, strict=True
        ):
            if weight_name not in arrays:
                names.append(weight_name)
                arrays[weight_name], types[weight_name] = array, param.ty
                continue
            if not tvm_ffi.structural_equal(types[weight_name], param.ty):
                raise BuildError(
                    f"stored weight '{weight_name}' is {types[weight_name]} at one resolution and {param.ty} "
                    f"at {format_resolution(entry.resolution)}: the entries cannot share weights"
                )
            if array is not arrays[weight_name] and not np.array_equal(
                _numpy(array), _numpy(arrays[weight_name])
            ):
                raise BuildError(
                    f"stored weight '{weight_name}' is computed differently at "
                    f"{format_resolution(entry.resolution)} than at the first resolution (a compile-time "
                    "weight transform chose differently): storing it twice would copy weights"
                )

    # a BlockBuilder gives each added function's GlobalVar its type, which calls to it need
    builder = relax.BlockBuilder()
    kernels: dict[int, list[tuple[Any, Any]]] = {}  # structural hash -> [(kernel without name, gvar)]
    taken: set[str] = set()
    for entry in entries:
        suffix = format_resolution(entry.resolution)
        rename: dict[str, Any] = {}
        others: list[tuple[str, Any]] = []  # this entry's Relax functions besides main
        for gvar, func in entry.mod.functions_items():
            if gvar.name_hint == "main":
                continue
            name = gvar.name_hint if gvar.name_hint not in taken else f"{gvar.name_hint}_{suffix}"
            if not isinstance(func, tirx.PrimFunc):
                taken.add(name)
                others.append((name, func))
                continue
            bare = func.without_attr("global_symbol")
            key = tvm_ffi.structural_hash(bare)
            same = next(
                (g for other, g in kernels.get(key, []) if tvm_ffi.structural_equal(other, bare)), None
            )
            if same is None:
                taken.add(name)
                same = builder.add_func(func.with_attr("global_symbol", name), name)
                kernels.setdefault(key, []).append((bare, same))
            rename[gvar.name_hint] = same
        renamer = _renamer()(rename)
        for name, func in others:
            rename[name] = builder.add_func(renamer.visit_expr(func), name)
        main = renamer.visit_expr(_with_weights(entry, names, types))
        builder.add_func(main.with_attr("global_symbol", entry.function), entry.function)
    merged = builder.get()
    if entries[0].mod.attrs:
        merged = merged.with_attrs(entries[0].mod.attrs)
    return merged, [arrays[n] for n in names], names


def _numpy(array: Any) -> np.ndarray:
    return array.numpy() if hasattr(array, "numpy") else np.asarray(array)


def _with_weights(entry: LoweredEntry, names: list[str], types: dict[str, Any]) -> Any:
    """``entry``'s ``main`` taking every weight of the merged artifact, in its order (the ones this
    resolution does not read as unused parameters)."""
    from tvm import relax

    main = entry.mod["main"]
    num_input = int(main.attrs["num_input"])
    own = dict(zip(entry.weight_names, main.params[num_input:], strict=True))
    weights = [own[n] if n in own else relax.Var(_var_name(n), types[n]) for n in names]
    params = list(main.params[:num_input]) + weights
    return relax.Function(params, main.body, main.ret_ty, main.is_pure, main.attrs, main.span)


def _var_name(weight_name: str) -> str:
    return "p_" + re.sub(r"\W", "_", weight_name)


@cache
def _renamer() -> type:
    from tvm import relax

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        """Points calls at the merged module's kernels (renamed, or shared with an earlier entry)."""

        def __init__(self, rename: dict[str, Any]) -> None:
            super().__init__()
            self.rename = rename

        def visit_global_var_(self, op: Any) -> Any:
            return self.rename.get(op.name_hint, op)

    return Rename
