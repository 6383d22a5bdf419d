"""The benchmark runner works end to end in quick mode; timings are never asserted."""

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
