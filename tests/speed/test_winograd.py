"""winograd-conv2d: exact transform matrices, numerics against torch for every variant (and the pass off),
the per-layer choice and its report, ineligible convs left alone, and the arm-a78 build. No timing
assertions: speed is measured by benchmarks/winograd.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from edgediff.kernels.winograd import ConvShape, direct_conv2d_numpy, winograd_conv2d_numpy, winograd_matrices
from edgediff.passes.winograd_conv2d import estimate_seconds, measure_error
from edgediff.targets import CostModel, load_target
from tests.conftest import pinned_host

TOLERANCE = 1e-4


class TinyConvs(torch.nn.Module):
    """A 3x3 conv with bias and a residual epilogue on an odd spatial size (partial tiles in both axes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.skip = torch.nn.Conv2d(8, 12, 1)  # 1x1: never rewritten
        self.tail = torch.nn.Conv2d(12, 12, 3, padding=0)  # no padding: output 8x9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.conv(x) + self.skip(x))
        return self.tail(h)


class Ineligible(torch.nn.Module):
    """Convs the rewrite must leave alone: stride 2, 1x1, grouped, dilated."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.point = torch.nn.Conv2d(8, 8, 1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dilated(self.grouped(self.point(self.down(x))))


def _inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return (torch.randn(1, 8, 10, 11),)


def _report(artifact: edgediff.Artifact, name: str) -> dict:
    return next(p for p in artifact.manifest["passes"] if p["name"] == name)["report"]


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transform_matrices_are_exact(m):
    mats = winograd_matrices(m)
    assert mats.A.shape == (m + 2, m) and mats.BT.shape == (m + 2, m + 2) and mats.G.shape == (m + 2, 3)
    rng = np.random.default_rng(m)
    d, g = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    got = mats.A.T @ ((mats.G @ g @ mats.G.T) * (mats.BT @ d @ mats.BT.T)) @ mats.A
    expected = [[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(m)] for i in range(m)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # the numpy model of the kernels (float32 storage) on a whole layer with partial tiles
    x, w = rng.standard_normal((2, 5, 7, 9)), rng.standard_normal((3, 5, 3, 3))
    pad = (1, 0, 2, 1)
    reference = direct_conv2d_numpy(x, w, pad)
    got = winograd_conv2d_numpy(x, w, m, pad, "float32", "float32")
    assert got.shape == reference.shape == (2, 3, 8, 8)
    assert np.abs(got - reference).max() < 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize("variant", ["off", "2", "4", "6", "4-unlifted"])
def test_variants_match_torch(variant, tmp_path):
    model, inputs = TinyConvs().eval(), _inputs()
    with torch.no_grad():
        expected = model(*inputs).numpy()
    lifted = not variant.endswith("-unlifted")  # unlifted: the weight transform is a scheduled kernel
    variant = variant.removesuffix("-unlifted")
    options = {"winograd-conv2d": {"variant": variant}} if variant != "off" else None
    artifact = edgediff.compile_model(
        model,
        inputs,
        output_dir=tmp_path / variant,
        passes={"winograd-conv2d": variant != "off", "lift-weight-transforms": lifted},
        pass_options=options,
        progress=False,
    )
    got = edgediff.load(artifact.path)(*inputs)
    err = float(np.abs(got - expected).max())
    assert err <= TOLERANCE * max(1.0, float(np.abs(expected).max())), err
    schedule = _report(artifact, "schedule")
    assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"], schedule
    names = [p["name"] for p in artifact.manifest["passes"]]
    if variant == "off":
        assert "winograd-conv2d" not in names
        return
    report = _report(artifact, "winograd-conv2d")
    layers = report["layers"]
    assert [layer["chosen"] for layer in layers] == [f"F{variant}"] * 2  # the two 3x3 convs, not the 1x1
    assert [layer["layer"] for layer in layers] == ["conv", "tail"]
    assert [layer["shape"] for layer in layers] == ["8->12 10x11 float32", "12->12 10x11 float32"]
    assert [layer["out"] for layer in layers] == ["10x11", "8x9"]
    m = int(variant)
    for layer in layers:
        assert 0 < layer["error"] <= layer["bound"]
        assert layer["transformed_weight_bytes"] == layer["weight_bytes"] * (m + 2) ** 2 // 9
    assert report["weight_bytes_after"] > report["weight_bytes_before"] > 0
    assert f"2 x F{variant}" in report["summary"]
    # input and output transforms of both layers (the output transform with its epilogue), and the weight
    # transforms unless they were lifted to compile time
    assert schedule["kernels_by_rule"]["WinogradTransform"] == (4 if lifted else 6)
    stored = [tensor["name"] for tensor in artifact.manifest["weights"]["tensors"]]
    assert sum(name.endswith(":winograd_weight") for name in stored) == (2 if lifted else 0)
    assert schedule["kernels_by_rule"]["Matmul"] >= 1


def test_batch_two_wide_padding_no_bias(tmp_path):
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wide = torch.nn.Conv2d(5, 7, 3, padding=2)  # output larger than the input
            self.plain = torch.nn.Conv2d(7, 6, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.plain(torch.relu(self.wide(x)))

    torch.manual_seed(0)
    model, inputs = Model().eval(), (torch.randn(2, 5, 9, 13),)  # batch 2: tiles of both images in one GEMM
    with torch.no_grad():
        expected = model(*inputs).numpy()
    artifact = edgediff.compile_model(
        model,
        inputs,
        output_dir=tmp_path / "b2",
        passes={"winograd-conv2d": True},
        pass_options={"winograd-conv2d": {"variant": 6}},
        progress=False,
    )
    got = edgediff.load(artifact.path)(*inputs)
    assert got.shape == expected.shape == (2, 6, 11, 15)
    assert np.abs(got - expected).max() <= TOLERANCE * max(1.0, float(np.abs(expected).max()))
    schedule = _report(artifact, "schedule")
    assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"]


def test_float16_variant_error_is_what_the_pass_measured(tmp_path):
    model, inputs = TinyConvs().eval(), _inputs()
    with torch.no_grad():
        expected = model(*inputs).numpy()
    errors = {}
    for variant in ("direct", "2"):
        artifact = edgediff.compile_model(
            model,
            inputs,
            output_dir=tmp_path / variant,
            passes={"cast-to-fp16": True, "winograd-conv2d": True},
            pass_options={"winograd-conv2d": {"variant": variant}},
            progress=False,
        )
        got = edgediff.load(artifact.path)(*inputs)
        errors[variant] = float(np.abs(got - expected).max() / np.abs(expected).max())
        layers = _report(artifact, "winograd-conv2d")["layers"]
        assert [layer["shape"].split()[-1] for layer in layers] == ["float16", "float16"]
        assert [layer["layer"] for layer in layers] == ["conv", "tail"]  # named through the weight casts
    measured = max(layer["errors"]["F2"] for layer in layers)
    # float16 storage of the transformed tiles adds about the error the pass measured for F2
    assert errors["2"] <= errors["direct"] + 4 * measured
    assert errors["2"] < 2e-3


def _run_pass(model: torch.nn.Module, inputs: tuple, **options):
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.analysis import relax_op_histogram
    from edgediff.passes.runner import run_passes

    imported = import_to_relax(capture(model, inputs))
    before = relax_op_histogram(imported.mod)
    # the choice follows the spec's cost model: pinned widths and cores, not this machine's
    mod, results = run_passes(
        imported.mod, pinned_host(), ["winograd-conv2d"], options={"winograd-conv2d": options}
    )
    return before, relax_op_histogram(mod), results[0].report


def test_ineligible_convs_are_untouched():
    before, after, report = _run_pass(Ineligible().eval(), (torch.randn(1, 8, 12, 12),), variant=4)
    assert report.layers == [] and before == after
    assert after["relax.nn.conv2d"] == 4
    # next to an eligible one only the eligible conv is rewritten
    before, after, report = _run_pass(TinyConvs().eval(), _inputs(), variant=4)
    assert before["relax.nn.conv2d"] - after["relax.nn.conv2d"] == 2
    assert after["relax.matmul"] - before.get("relax.matmul", 0) == 2


def test_auto_choice_by_cost_and_error():
    # a tiny layer: three kernels and padded tiles cost more than they save -> direct
    _, after, report = _run_pass(TinyConvs().eval(), _inputs())
    assert [layer.chosen for layer in report.layers] == ["direct", "direct"]
    assert after["relax.nn.conv2d"] == 3
    # the SD 1.5 UNet's first-stage conv: a Winograd variant within the bound, estimated well ahead
    cost = CostModel(pinned_host())
    shape = ConvShape(1, 320, 64, 64, 320, (1, 1, 1, 1), "float32", "float32")
    lanes = 2 * cost.vector_lanes("float32")
    direct = estimate_seconds(cost, shape, None, lanes)
    assert all(estimate_seconds(cost, shape, m, lanes) < direct / 1.5 for m in (4, 6))
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).eval()
    # a one-layer model: any Winograd variant grows its weights several times, so lift the model budget
    _, _, report = _run_pass(conv, (torch.randn(1, 320, 64, 64),), max_weight_growth=10)
    (layer,) = report.layers
    assert layer.chosen in ("F4", "F6") and layer.estimated_speedup > 1.5
    assert layer.error <= 1e-3 and layer.errors["F6"] > layer.errors["F2"]
    # the manifest's record of the layer is the same decision
    record = report.to_dict()["layers"][0]
    assert record["chosen"] == layer.chosen and record["error"] == layer.error
    # a bound below every Winograd variant's error leaves the layer direct
    _, _, strict = _run_pass(conv, (torch.randn(1, 320, 64, 64),), error_bound=1e-9, max_weight_growth=10)
    assert strict.layers[0].chosen == "direct"
    assert "0 of 1" in strict.summary
    # so does a speedup requirement above the estimate
    _, _, demanding = _run_pass(conv, (torch.randn(1, 320, 64, 64),), min_speedup=100, max_weight_growth=10)
    assert demanding.layers[0].chosen == "direct"


class TwoResolutions(torch.nn.Module):
    """A 64x64 and a 32x32 layer of 64 channels, and a big 1x1 projection that holds most of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.high = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.down = torch.nn.Conv2d(64, 64, 2, stride=2)
        self.low = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.proj = torch.nn.Conv2d(64, 1024, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.low(self.down(self.high(x))))


def test_the_weight_budget_goes_to_the_layers_that_save_most_per_byte():
    inputs = (torch.randn(1, 64, 64, 64),)
    _, _, free = _run_pass(TwoResolutions().eval(), inputs, max_weight_growth=10)
    preferred = {layer.name: layer.chosen for layer in free.layers}
    assert all(v != "direct" for v in preferred.values()), preferred
    model_bytes = free.model_weight_bytes
    layer_bytes = free.layers[0].weight_bytes
    # room for one layer's transform at its preferred variant, not two: the 64x64 layer (more time
    # saved for the same bytes) keeps its variant, the 32x32 layer falls back to what still fits
    room = (free.layers[0].transformed_weight_bytes - layer_bytes) * 1.2
    _, _, tight = _run_pass(TwoResolutions().eval(), inputs, max_weight_growth=room / model_bytes)
    high, low = tight.layers
    assert high.chosen == preferred[high.name] and not high.over_budget
    assert low.over_budget and low.chosen != preferred[low.name]
    extra = sum(layer.transformed_weight_bytes - layer.weight_bytes for layer in tight.layers)
    assert extra <= room
    # nothing fits: everything stays direct and the report says why
    _, _, none = _run_pass(TwoResolutions().eval(), inputs, max_weight_growth=0)
    assert [layer.chosen for layer in none.layers] == ["direct", "direct"]
    assert none.over_budget == 2


def test_measured_error_grows_with_tile_and_precision():
    errors32 = [measure_error(m, 64, "float32", "float32") for m in (2, 4, 6)]
    assert errors32[0] < errors32[1] and max(errors32) < 1e-4
    errors16 = [measure_error(m, 64, "float16", "float16") for m in (2, 4, 6)]
    assert all(e16 > e32 for e16, e32 in zip(errors16, errors32, strict=True))
    # float16 storage of F(6x6,3x3)'s transformed tiles is well beyond the default bound
    assert errors16[2] > 1e-3 + measure_error(None, 64, "float16", "float16")


def test_unknown_variant_is_refused():
    from edgediff.errors import PassError
    from edgediff.passes.winograd_conv2d import WinogradConv2d

    with pytest.raises(PassError, match="unknown variant"):
        WinogradConv2d(load_target("host"), variant=3)


@pytest.mark.slow
def test_arm_a78_build(tmp_path):
    from tests.conftest import AARCH64, elf_machine

    artifact = edgediff.compile_model(
        TinyConvs().eval(),
        _inputs(),
        target="arm-a78",
        output_dir=tmp_path / "a78",
        passes={"winograd-conv2d": True},
        pass_options={"winograd-conv2d": {"variant": 4}},
        progress=False,
    )
    assert artifact.manifest["library"]["format"] == "shared"
    assert elf_machine(artifact.path / artifact.manifest["library"]["file"]) == AARCH64
    schedule = _report(artifact, "schedule")
    assert schedule["scheduled"] == schedule["kernels"] and not schedule["rule_failures"]
    assert schedule["kernels_by_rule"]["WinogradTransform"] >= 4


def test_default_on_for_cpu_targets_only():
    from edgediff.passes import resolve_pipeline

    for target in ("host", "arm-a78", "arm-a55"):
        names = resolve_pipeline(load_target(target), None)
        assert names.index("winograd-conv2d") < names.index("legalize")
    for target in ("adreno-740", "ane-like"):
        assert "winograd-conv2d" not in resolve_pipeline(load_target(target), None)


def test_weight_transform_reads_only_the_weight():
    """What lets lift-weight-transforms move U = G g G^T to compile time: its call reads a weight parameter
    and nothing else."""
    from tvm import relax

    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    imported = import_to_relax(capture(TinyConvs().eval(), _inputs()))
    mod, _ = run_passes(
        imported.mod,
        load_target("host"),
        ["winograd-conv2d", "legalize"],
        options={"winograd-conv2d": {"variant": 4}},
    )
    main = mod["main"]
    weights = set(list(main.params)[int(main.attrs["num_input"]) :])
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.name == "relax.call_tir":
            if expr.args[0].name_hint.startswith("winograd_weight"):
                calls.append(expr)

    relax.analysis.post_order_visit(main, visit)
    assert len(calls) == 2
    for call in calls:
        (arg,) = call.args[1].fields
        assert arg in weights
