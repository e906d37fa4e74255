"""benchmarks.profile, the per-call breakdown the GPU issues ask for: it runs here (CPU activity only)
and reports what it promises, so a GPU session can rely on it."""

import json

from benchmarks import profile


def test_profile_writes_a_breakdown_per_case(tmp_path, capsys):
    profile.main(["center-loss-fused", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "profile.json").read_text())
    case = report["cases"]["center-loss-fused"]
    assert case["calls"] == profile.CALLS and case["wall_ms_per_call"] > 0
    assert {"kernels_per_call", "syncs_per_call", "device_to_host_reads_per_call", "allocator_calls_per_call"} <= set(
        case
    )
    assert case["top_ops"] and any("CenterLoss" in op["op"] for op in case["top_ops"])
    assert (tmp_path / "center-loss-fused.json").stat().st_size > 0  # the Chrome trace
    assert "center-loss-fused:" in capsys.readouterr().out
