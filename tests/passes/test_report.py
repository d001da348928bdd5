"""Typed pass reports: what ``to_dict`` writes into the manifest, and the typed accessors of hand-offs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from edgediff.passes.fuse_attention import FuseAttentionReport, FusedAttentionSite
from edgediff.passes.lift_weight_transforms import LiftWeightTransformsReport, WeightTransform
from edgediff.passes.npu_tiling import NPUTilingReport, npu_tiling_plan
from edgediff.passes.pack_matmul_weights import PackMatmulWeightsReport, weight_layouts
from edgediff.passes.report import PassReport, handoff, optional
from edgediff.passes.runner import PassResult, weight_transform


@dataclass
class _Row:
    block: str
    tiles: int = 0
    note: str | None = optional()


@dataclass
class _Report(PassReport):
    count: int = 0
    rows: list[_Row] = field(default_factory=list)
    maybe: int | None = optional()
    kept_none: int | None = None
    state: object = handoff()


def test_to_dict_keeps_field_order_and_leaves_out_handoffs_and_unset_optionals():
    report = _Report("two rows", count=2, rows=[_Row("a", 1), _Row("b", 2, note="x")], state=object())
    assert report.to_dict() == {
        "summary": "two rows",
        "count": 2,
        "rows": [{"block": "a", "tiles": 1}, {"block": "b", "tiles": 2, "note": "x"}],
        "kept_none": None,  # a plain field that is None stays: only optional() ones are left out
    }
    assert list(report.to_dict()) == ["summary", "count", "rows", "kept_none"]
    assert _Report("s", maybe=0).to_dict()["maybe"] == 0  # only None is left out, not a falsy value
    # the manifest gets copies: changing them does not change the report
    report.to_dict()["rows"][0]["tiles"] = 99
    assert report.rows[0].tiles == 1


def test_skipped_reports_serialise_to_their_summary_alone():
    assert FuseAttentionReport("skipped: not a CPU").to_dict() == {"summary": "skipped: not a CPU"}
    assert NPUTilingReport("skipped, no NPU program: x").to_dict() == {
        "summary": "skipped, no NPU program: x"
    }
    assert LiftWeightTransformsReport("no weight-only computation found").to_dict() == {
        "summary": "no weight-only computation found",
        "lifted": 0,
    }


def test_fused_sites_serialise_as_the_manifest_records_them():
    site = FusedAttentionSite(2, 16, 8, 4, "float32", 0.5, True, 1024, {"block_n": 8}, True)
    report = FuseAttentionReport("1 site", sites=[site], score_bytes_avoided=0, exp="fast")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["sites"] == [
        {
            "batch_heads": 2,
            "n": 16,
            "m": 8,
            "head_dim": 4,
            "dtype": "float32",
            "scale": 0.5,
            "safe_softmax": True,
            "score_bytes": 1024,
            "tiles": {"block_n": 8},
            "scores_still_materialised": True,
        }
    ]
    assert list(data) == ["summary", "sites", "score_bytes_avoided", "exp"]


def test_handoffs_are_found_by_report_type():
    transform = WeightTransform(module=None, kept=[0], transform_inputs=[1])
    results = [
        PassResult("fuse-attention", FuseAttentionReport("skipped"), 0.0),
        PassResult(
            "pack-matmul-weights", PackMatmulWeightsReport("p", weight_layouts={1: {"panel": 8}}), 0.0
        ),
        PassResult(
            "lift-weight-transforms",
            LiftWeightTransformsReport("l", lifted=1, weight_transform=transform),
            0.0,
        ),
    ]
    assert weight_transform(results) is transform
    assert weight_layouts(results, ["a", "b"]) == {"b": {"panel": 8}}
    assert npu_tiling_plan(results) is None  # no npu-tiling run
    assert "weight_transform" not in results[2].report.to_dict()
    assert "weight_layouts" not in results[1].report.to_dict()
    # none of the passes ran: nothing handed on
    assert weight_transform(results[:1]) is None and weight_layouts(results[:1], ["a"]) == {}
