"""Model-level tiling to the NPU's SRAM: tiled numerics equal the untiled model, every simulated tile fits,
a smaller SRAM gives smaller tiles, and an SRAM too small for one op is a clear error."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from edgediff.npu import graph as npu_graph
from edgediff.npu import plan_model
from edgediff.npu.simulator import Simulator, SramOverflowError, run_reference
from edgediff.npu.tile_planner import SramTooSmallError, build_program, form_groups, plan_groups
from edgediff.targets import load_target
from edgediff.targets.spec import TargetSpec

# small enough that the tiny models' regions are cut into many tiles (row bands with halos, statistics
# phases, column tiles), large enough for each op's smallest tile
SRAM = {"tiny-sd15-unet": 32 * 1024, "tiny-dit": 10 * 1024, "tiny-vae-decoder": 32 * 1024}


class Attention(torch.nn.Module):
    """Self-attention over 512 tokens: at 48 KiB of SRAM its keys and values must stream in blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(64, 192)
        self.out = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 32)).permute(2, 0, 3, 1, 4)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _prepare(model: Any, inputs: Any = None) -> dict[str, Any]:
    """The op-level Relax module as the ane-like pipeline has it before npu-tiling, with its weights."""
    from edgediff import zoo
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    spec = load_target("ane-like")
    if isinstance(model, str):
        zm = zoo.build(model)
        module, inputs = zm.module, zm.example_inputs
        captured = capture(zm)
    else:
        module = model
        captured = capture(model, inputs)
    imported = import_to_relax(captured)
    mod, _ = run_passes(imported.mod, spec, ["decompose-for-inference", "cast-to-fp16"])
    graph = npu_graph.from_relax(mod)
    with torch.no_grad():
        expected = module(*inputs).float().numpy()
    return {
        "mod": mod,
        "graph": graph,
        "spec": spec,
        "weights": {t.name: w.numpy() for t, w in zip(graph.weights, imported.weights, strict=True)},
        "inputs": {t.name: x.numpy() for t, x in zip(graph.inputs, inputs, strict=True)},
        "torch": expected,
    }


@pytest.fixture(scope="module")
def prepared() -> Any:
    cache: dict[str, Any] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            cache[name] = (
                _prepare(Attention(), (torch.randn(1, 512, 64),)) if name == "attention" else _prepare(name)
            )
        return cache[name]

    return get


def _plan(p: dict[str, Any], sram: int, spec: TargetSpec | None = None) -> tuple[list[Any], dict[str, Any]]:
    spec = spec or p["spec"]
    groups = plan_groups(form_groups(p["graph"], spec), p["graph"], spec, sram)
    return groups, build_program(p["graph"], groups, spec, sram)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.mark.parametrize("name", ["tiny-sd15-unet", "tiny-dit", "tiny-vae-decoder"])
def test_tiled_program_matches_untiled_model(prepared, name):
    p = prepared(name)
    sram = SRAM[name]
    groups, program = _plan(p, sram)
    result = Simulator(json.loads(json.dumps(program)), p["weights"]).run(p["inputs"])
    untiled = run_reference(p["graph"], p["inputs"], p["weights"])
    # the program really is tiled: more tiles than regions, and every tile within the SRAM
    npu = [g for g in groups if g.device == "npu"]
    assert result.tiles > len(npu)
    assert 0 < result.sram_peak <= sram
    assert _rel(result.output, untiled) < 2e-3
    assert _rel(result.output, p["torch"]) < 1e-2
    # fewer DRAM bytes than op-by-op execution of the same graph
    unfused = npu_graph.from_relax(p["mod"], fuse_attention=False)
    from edgediff.npu.tile_planner import op_by_op_bytes

    assert result.dram_bytes < sum(op_by_op_bytes(unfused).values())


def test_unet_tiling_uses_halo_chains_statistics_phases_and_weight_tiles(prepared):
    p = prepared("tiny-sd15-unet")
    groups, _ = _plan(p, SRAM["tiny-sd15-unet"])
    chains = [
        g
        for g in groups
        if g.device == "npu" and {"relax.nn.group_norm", "relax.nn.conv2d"} <= {n.op for n in g.nodes}
    ]
    cut = [g for g in chains if any(a["role"] == "rows" and a["tile"] < a["size"] for a in g.plan["axes"])]
    assert cut, "no GroupNorm -> conv chain cut into row bands"
    # statistics from a phase of their own, or accumulated by the region that produced the input
    assert all(g.plan["stats_phase"] or "stats_in" in g.plan for g in cut)
    assert any("stats_in" in g.plan for g in cut) and any(g.plan["stats_phase"] for g in groups if g.plan)
    assert any(
        a["role"] == "cols" and a["tile"] < a["size"] for g in groups if g.plan for a in g.plan["axes"]
    )


def test_attention_streams_key_blocks_with_online_softmax(prepared):
    p = prepared("attention")
    sram = 48 * 1024
    groups, program = _plan(p, sram)
    attention = [g for g in groups if any(n.op == npu_graph.ATTENTION_OP for n in g.nodes)]
    assert len(attention) == 1
    assert attention[0].plan["kv_block"] < 512  # keys and values do not fit: streamed in blocks
    result = Simulator(program, p["weights"]).run(p["inputs"])
    assert result.sram_peak <= sram
    assert _rel(result.output, run_reference(p["graph"], p["inputs"], p["weights"])) < 2e-3
    assert _rel(result.output, p["torch"]) < 1e-2


def test_simulator_refuses_a_tile_outside_the_sram(prepared):
    p = prepared("tiny-dit")
    _, program = _plan(p, SRAM["tiny-dit"])
    program = copy.deepcopy(program)
    program["sram_bytes"] = SRAM["tiny-dit"] // 4  # the same program on a smaller SRAM
    with pytest.raises(
        SramOverflowError, match=rf"needs SRAM bytes \[\d+, \d+\), beyond the {program['sram_bytes']}-byte"
    ):
        Simulator(program).run()
    _, program = _plan(p, SRAM["tiny-dit"])
    first = next(i for i in program["instructions"] if i["i"] == "dma_in")
    second = next(
        i
        for i in program["instructions"]
        if i["i"] == "dma_in" and i is not first and i["group"] == first["group"]
    )
    second["offset"] = first["offset"]  # two live buffers at one address
    with pytest.raises(SramOverflowError, match="overlaps live buffer"):
        Simulator(program).run()


def test_halving_sram_in_a_user_yaml_shrinks_tiles(prepared, tmp_path):
    p = prepared("tiny-vae-decoder")
    data = load_target("ane-like").to_dict()
    tiles = {}
    for sram in (64 * 1024, 32 * 1024):
        data["name"] = "my-npu"
        data["memory"]["sram_bytes"] = sram
        path = tmp_path / f"npu-{sram}.yaml"
        path.write_text(yaml.safe_dump(data))
        spec = load_target(str(path))
        plan = plan_model(p["mod"], spec, spec.memory.sram_bytes)
        assert 0 < plan.simulation.sram_peak <= sram
        tiles[sram] = {g.last.name: g.plan for g in plan.groups if g.device == "npu"}
    big, small = tiles[64 * 1024], tiles[32 * 1024]
    assert sum(t["tiles"] for t in small.values()) > sum(t["tiles"] for t in big.values())
    shared = [name for name in big if name in small]
    assert all(small[n]["working_set"] <= 32 * 1024 for n in shared)

    # a region cut at both sizes gets smaller tiles (fewer elements per tile) at half the SRAM
    def elements(plan: dict[str, Any]) -> int:
        return int(np.prod([a["tile"] for a in plan["axes"]])) if plan["axes"] else 0

    assert any(elements(small[n]) < elements(big[n]) for n in shared)


@pytest.mark.parametrize("sram", [24 * 1024, 40 * 1024, 48 * 1024, 96 * 1024, 256 * 1024])
def test_every_simulated_tile_fits_across_sram_sizes(prepared, sram):
    # the simulator checks every buffer against the SRAM and the live buffers; counting only
    for name in ("tiny-sd15-unet", "attention"):
        _, program = _plan(prepared(name), sram)
        result = Simulator(program).run()
        assert 0 < result.sram_peak <= sram


def test_sram_too_small_for_one_op_names_it(prepared):
    p = prepared("tiny-sd15-unet")
    pattern = (
        r"SRAM of 4096 bytes .* too small for op relax\.\S+ '\w+' \(layer unet_\w+\): "
        r"its smallest tile needs \d+ bytes"
    )
    with pytest.raises(SramTooSmallError, match=pattern):
        _plan(p, 4096)


def test_npu_tiling_pass_report_and_overflow_error_through_compile(prepared):
    from edgediff.errors import EdgediffError
    from edgediff.passes.npu_tiling import npu_tiling_plan
    from edgediff.passes.runner import run_passes

    p = prepared("tiny-dit")
    _, results = run_passes(p["mod"], p["spec"], ["npu-tiling"])
    report = results[0].report
    assert report.total.tiled < report.total.op_by_op
    assert report.total.sram_peak <= p["spec"].memory.sram_bytes
    assert npu_tiling_plan(results) is not None and npu_tiling_plan(results) is report.plan
    # the plan is handed on, not written into the manifest's report
    assert "plan" not in report.to_dict() and report.to_dict()["total"]["tiled"] == report.total.tiled
    with pytest.raises(EdgediffError, match="too small for op"):
        run_passes(p["mod"], p["spec"], ["npu-tiling"], options={"npu-tiling": {"sram_bytes": 1024}})
