"""The compiled int8 activation quantizer and the torch fake-quant decide rounding ties the same way.

Both compute ``clip(round(x / scale))`` with ``scale = max|x| / 127`` (per token) or a calibrated constant
(static), in float32, dividing (not multiplying by ``1 / scale``) and rounding half to even (TVM lowers
``round`` to LLVM's ``nearbyint``, torch's ``round`` is half-to-even). These inputs put most elements
exactly on ``k + 0.5`` after the float32 division, so any difference in rounding mode or op order shows
as a whole quantization step; the layer is an identity Linear, so the output is the dequantized input.

(What a tie can still do in a whole model - a quantizer input that the compiled kernels compute a few
ulps away from torch's, across a boundary - is bounded in ``ties.py``, used by ``test_compile.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgediff
from edgediff.precision import PrecisionPlan
from edgediff.precision.quantizers import INT8_MAX
from edgediff.precision.sensitivity import FakeQuant

TOKENS, WIDTH = 24, 32


class Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(WIDTH))  # int8 weight 127, scale 1/127: exactly representable
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _plan(artifact: edgediff.Artifact) -> PrecisionPlan:
    passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
    return PrecisionPlan.from_dict(passes["mixed-precision"]["plan"])


def _reference(model: nn.Module, x: np.ndarray, plan: PrecisionPlan) -> np.ndarray:
    scales = {layer.name: layer.scales for layer in plan.layers if layer.scales}
    assignment = {layer.name: layer.format for layer in plan.layers}
    with torch.no_grad(), FakeQuant(model, assignment, plan.dtypes, scales):
        return model(torch.from_numpy(x)).numpy()


def _ties(scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(k + 0.5) * scale`` for random k in [-127, 126] (both signs: half-away-from-zero and
    half-to-even differ on negative and positive ties alike)."""
    k = rng.integers(-127, 127, size=(TOKENS, WIDTH)).astype(np.float64)
    return ((k + 0.5) * scale.astype(np.float64)).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> Identity:
    return Identity()


def _compile(model: Identity, precision: str, host_int8, path) -> edgediff.Artifact:
    example = torch.randn(1, TOKENS, WIDTH, generator=torch.Generator().manual_seed(0))
    return edgediff.compile_model(
        model,
        (example,),
        target=host_int8,
        input_names=["x"],
        output_dir=path,
        progress=False,
        precision=precision,
    )


def _check(got: np.ndarray, want: np.ndarray, x: np.ndarray, scale: np.ndarray) -> None:
    ratio = x / scale  # float32, as both implementations divide
    ties = ratio - np.floor(ratio) == 0.5
    assert ties.mean() > 0.3, "the inputs must put many elements exactly on a tie"
    # compiled == reference: the identity layer's outputs agree to float32 rounding of the rescale, far
    # below the whole step that a tie decided the other way would make
    assert np.all(np.abs(got - want) <= 1e-3 * scale), f"{float((np.abs(got - want) / scale).max())} steps"
    # ... and the check has teeth: half-away-from-zero rounding, or x * (1 / scale), disagree at ties
    away = np.sign(ratio) * np.floor(np.abs(ratio) + 0.5) * scale
    assert np.sum(np.abs(away - got) > 0.5 * scale) >= 0.1 * ties.sum()
    reciprocal = np.rint(x * (np.float32(1) / scale)) * scale
    assert np.any(np.abs(reciprocal - got) > 0.5 * scale)


def test_per_token_ties_round_like_the_reference(model, host_int8, tmp_path):
    artifact = _compile(model, "w8a8-token", host_int8, tmp_path / "token")
    plan = _plan(artifact)
    assert plan.layer("proj").format == "w8a8-token"
    rng = np.random.default_rng(0)
    peak = rng.uniform(0.5, 3.0, size=(TOKENS, 1)).astype(np.float32)
    scale = peak / np.float32(INT8_MAX)  # the per-token scale both sides compute, in float32
    x = _ties(scale, rng)
    x[:, :1] = np.where(rng.random((TOKENS, 1)) < 0.5, peak, -peak)  # each row's max |x| is its peak
    x = x[None]
    got = artifact.load()(x)
    _check(got[0], _reference(model, x, plan)[0], x[0], scale)


def test_static_scale_ties_round_like_the_reference(model, host_int8, tmp_path):
    artifact = _compile(model, "w8a8", host_int8, tmp_path / "static")
    plan = _plan(artifact)
    layer = plan.layer("proj")
    assert layer.format == "w8a8" and len(layer.scales) == 1
    scale = np.full((TOKENS, 1), layer.scales[0], dtype=np.float32)  # the graph's float32 constant
    x = _ties(scale, np.random.default_rng(1))[None]
    got = artifact.load()(x)
    _check(got[0], _reference(model, x, plan)[0], x[0], scale)
