"""The measurement's prediction with a bound for rounding ties, to compare a compiled artifact against.

The compiled quantizers and the torch fake-quant round the same way (half to even, ``x / scale`` with the
same scale; ``test_rounding_ties.py`` proves it on exact ties), but the *inputs* of a quantizer are
computed by different kernels (TVM's fused, vectorized, FMA-contracted loops vs torch's): they agree to a
few float32 ulps, not bit for bit. An input within that distance of a rounding boundary (``k + 0.5`` int8
steps, or the midpoint between two float16 neighbours) may round to the other neighbour in the artifact:
one quantization step of that one element, which then propagates to the output. Which elements do this
depends on the machine (vector width, summation order) and on which formats a measured plan picked.

So the reference records every activation rounding whose input lies within ``margin`` (relative to the
largest magnitude of the tensor) of a boundary, reruns the model once per such site with that one element
rounded the other way, and returns, per output element, the sum of those effects: the most a set of tie
flips can move the artifact's output (to first order). Everything else must match as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch

from edgediff.precision import sensitivity
from edgediff.precision.plan import PrecisionPlan
from edgediff.precision.quantizers import INT8_MAX, INT8_MIN, MIN_SCALE
from edgediff.precision.sensitivity import FakeQuant

# How far (relative to the tensor's largest magnitude) the artifact's quantizer input may be from torch's:
# 2^-20, 16 float32 ulps of the largest element. The flips seen on tiny-dit plans were all within 2^-22
# (reordered float32 sums, FMA contraction, the ~1e-7 relative error of the vectorized exp/erf of
# backend/fast_math.py); 2^-20 is far below one int8 step (1/127 of a row) and keeps the sites few.
MARGIN = 2.0**-20


@dataclass(frozen=True)
class Site:
    """One rounding near a boundary: the ``call``-th activation rounding of a forward, element ``index``
    (flat), and the value it has when rounded to the other neighbour."""

    call: int
    kind: str  # "int8" or "float16"
    index: int
    other: float


class _Roundings:
    """Stand-ins for the activation quantizers of ``sensitivity.py``: the same values, plus either
    recording the sites near a boundary (``flip`` None) or rounding the site ``flip`` the other way."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.flip: Site | None = None
        self.calls = 0
        self.sites: list[Site] = []
        self.originals = (
            sensitivity.fake_quant_static,
            sensitivity.fake_quant_dynamic,
            sensitivity.round_fp16,
        )

    def patch(self) -> mock._patch:
        return mock.patch.multiple(
            sensitivity, fake_quant_static=self.static, fake_quant_dynamic=self.dynamic, round_fp16=self.fp16
        )

    def _visiting(self) -> tuple[int, bool]:
        """This rounding's number in the forward, and whether it needs looking at (recording, or the
        rounding to flip)."""
        call, self.calls = self.calls, self.calls + 1
        return call, self.flip is None or self.flip.call == call

    def static(self, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        out = self.originals[0](x, scale)
        call, visit = self._visiting()
        return self._int8(call, x, torch.as_tensor(scale, dtype=x.dtype), out) if visit else out

    def dynamic(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = self.originals[1](x, dim)
        call, visit = self._visiting()
        if not visit:
            return out
        # the scale formula of quantizers.fake_quant_dynamic (and of the compiled graph)
        scale = (x.abs().amax(dim=dim, keepdim=True) / INT8_MAX).clamp_min(MIN_SCALE)
        return self._int8(call, x, scale, out)

    def _int8(self, call: int, x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ratio = (x.double() / scale.double()).broadcast_to(x.shape)
        chosen = (out.double() / scale.double()).round()  # the integer q of out = q * scale
        other = torch.where(ratio > chosen, chosen + 1, chosen - 1)
        distance = ((ratio - ratio.floor() - 0.5).abs() * scale.double()).broadcast_to(x.shape)
        near = (distance <= self.margin * float(x.abs().max())) & (other >= INT8_MIN) & (other <= INT8_MAX)
        return self._site(call, "int8", out, near, (other * scale.double()).broadcast_to(x.shape))

    def fp16(self, x: torch.Tensor) -> torch.Tensor:
        out = self.originals[2](x)
        call, visit = self._visiting()
        if not visit:
            return out
        exact = x.detach().double().numpy()
        rounded = out.detach().numpy().astype(np.float16)
        other = np.nextafter(rounded, np.where(exact > rounded, np.inf, -np.inf).astype(np.float16))
        midpoint = (rounded.astype(np.float64) + other.astype(np.float64)) / 2
        near = (np.abs(midpoint - exact) <= self.margin * float(np.abs(exact).max())) & (exact != rounded)
        return self._site(
            call, "float16", out, torch.from_numpy(near), torch.from_numpy(other.astype(np.float64))
        )

    def _site(
        self, call: int, kind: str, out: torch.Tensor, near: torch.Tensor, other: torch.Tensor
    ) -> torch.Tensor:
        if self.flip is None:
            for index in torch.nonzero(near.reshape(-1)).flatten().tolist():
                self.sites.append(Site(call, kind, index, float(other.reshape(-1)[index])))
            return out
        out = out.clone()  # keeps the strides: the rest of the forward runs as in the recording
        out[np.unravel_index(self.flip.index, tuple(out.shape))] = self.flip.other
        return out


def fake_quant_with_ties(
    model, inputs: Sequence[torch.Tensor], plan: PrecisionPlan, margin: float = MARGIN
) -> tuple[np.ndarray, np.ndarray, list[Site]]:
    """``(prediction, slack, sites)``: what the measurement says ``plan`` computes, and per output element
    the summed effect of rounding each near-boundary site the other way."""
    scales = {layer.name: layer.scales for layer in plan.layers if layer.scales}
    assignment = {layer.name: layer.format for layer in plan.layers}
    roundings = _Roundings(margin)
    with roundings.patch(), torch.no_grad():
        with FakeQuant(model, assignment, plan.dtypes, scales, plan.timestep_split) as fake:
            fake.timesteps = inputs[1].float()
            want = model(*inputs).numpy()
            slack = np.zeros_like(want, dtype=np.float64)
            for site in list(roundings.sites):
                roundings.flip, roundings.calls = site, 0
                slack += np.abs(model(*inputs).numpy() - want)
    return want, slack, roundings.sites


def assert_matches_measurement(
    got: np.ndarray, model, inputs: Sequence[torch.Tensor], plan: PrecisionPlan, tolerance: float
) -> None:
    """The artifact's output ``got`` is the measurement's prediction to ``tolerance`` (relative to its
    largest magnitude), beyond the effect of the rounding ties (:func:`fake_quant_with_ties`)."""
    want, slack, sites = fake_quant_with_ties(model, inputs, plan)
    scale = float(np.abs(want).max())
    excess = float((np.abs(got - want) - slack).max()) / scale
    kinds = {kind: sum(s.kind == kind for s in sites) for kind in ("int8", "float16")}
    assert excess < tolerance, (
        f"error {float(np.abs(got - want).max()) / scale:.3g} exceeds the {tolerance:g} tolerance by more "
        f"than the {slack.max() / scale:.3g} that {len(sites)} near-tie roundings {kinds} can explain"
    )
