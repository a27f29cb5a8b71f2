"""The fault campaign (benchmarks/fault_campaign.py): 10 SIGKILLs at random moments of a run, several mid-write,
each followed by the same command. About two minutes on 2 cores, so `slow`: `pytest -m slow tests/test_faults.py`."""

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_run_recovers_from_every_kill(tmp_path, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "fault_campaign.py"
    spec = importlib.util.spec_from_file_location("fault_campaign", path)
    campaign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(campaign)
    status = campaign.main(["--kills", "10", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0 and "recovered: 10/10" in out, out
    assert "| write | True | ." in out  # at least one kill landed while a checkpoint's temporary file existed
