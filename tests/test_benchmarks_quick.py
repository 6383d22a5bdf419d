"""The benchmark runner and modules work end to end in quick mode; timings are never asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` lives beside `tests`, not in the package
    sys.path.insert(0, str(ROOT))

from benchmarks.run import IMPLS, SCENARIOS, main  # noqa: E402


@pytest.mark.timeout(120)
def test_quick_run_writes_numeric_results_for_every_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.json"

    assert main(["--quick", "--json", str(out)]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["quick"] is True
    assert set(report["scenarios"]) == {s.name for s in SCENARIOS}
    for scenario in SCENARIOS:
        entry = report["scenarios"][scenario.name]
        assert entry["errors"] == {}, entry["errors"]
        assert set(entry["results"]) == set(scenario.runners), scenario.name
        assert "cluster" in entry["results"]
        for impl, metrics in entry["results"].items():
            assert impl in IMPLS
            assert metrics, (scenario.name, impl)
            for metric, stat in metrics.items():
                for key in ("median", "min", "max"):
                    value = stat[key]
                    assert isinstance(value, int | float), (scenario.name, impl, metric, key)
                    assert math.isfinite(value), (scenario.name, impl, metric, key)
                assert stat["min"] <= stat["median"] <= stat["max"]
        for metric, ratio in entry["ratio_cluster_tpe"].items():
            assert math.isfinite(ratio), (scenario.name, metric)
    table = capsys.readouterr().out
    for scenario in SCENARIOS:
        assert scenario.name in table


def test_only_selects_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "only.json"

    assert main(["--quick", "--only", "cancel", "--repeats", "1", "--json", str(out)]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["scenarios"]) == {"cancel"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["semantics", "coordination"])
def test_quick_run_of_a_module_prints_and_writes_every_row(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks.semantics`` and ``benchmarks.coordination`` in ``--quick`` mode: every
    scenario gives its rows, each a finite number; their own checks of the outcomes
    (no lost task, every run on its grid time...) raise if one is wrong."""
    import importlib

    bench = importlib.import_module(f"benchmarks.{module}")
    out = tmp_path / f"{module}.json"

    assert bench.main(["--quick", "--json", str(out)]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["quick"] is True
    rows = report["rows"]
    assert rows
    for row in rows:
        assert row["samples"], row
        assert all(math.isfinite(v) for v in row["samples"]), row
        assert math.isfinite(row["value"]), row
        assert row["ok"] in (True, False, None), row
        if row["target"]:
            assert row["ok"] is not None, row
    table = capsys.readouterr().out
    for row in rows:
        assert row["metric"] in table
    assert len({row["scenario"] for row in rows}) == len(bench.SCENARIOS)  # each one ran


@pytest.mark.timeout(180)
def test_against_an_earlier_commit_runs_both_packages_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``benchmarks.against HEAD --quick``: the committed package, loaded as
    ``cluster_ref`` beside the working tree's, runs every scenario (their outcome
    checks raise if a task is lost) and each gets its row."""
    from benchmarks.against import main as against

    assert against(["HEAD", "--quick"]) == 0

    table = capsys.readouterr().out
    for name in ("e2e_w1", "e2e_w4", "submit", "drain", "features", "cancel_task", "handle_cancel"):
        assert name in table
    assert "cluster_ref" in sys.modules and sys.modules["cluster_ref"] is not sys.modules["cluster"]
