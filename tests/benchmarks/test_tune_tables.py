"""``tune_tables.py --from-cache``: a GPU run's tuning cache merges into that GPU's shipped table on a CPU machine."""

from __future__ import annotations

import json

from p4q_engine.kernels.tuning import GPU_CANDIDATES, table_path
from p4q_engine.kernels.tuning import config_json as asdict

from benchmarks.tune_tables import main


def test_merge_cache_keeps_previous_entries_and_only_that_gpu(tmp_path):
    a, b, c = GPU_CANDIDATES[0], GPU_CANDIDATES[1], GPU_CANDIDATES[2]
    out = tmp_path / "tuned"
    out.mkdir()
    target = table_path("NVIDIA H200", out)
    target.write_text(
        json.dumps(
            {
                "gpu": "NVIDIA H200",
                "applies_to": ["NVIDIA H100"],
                "measured": "old",
                "configs": {"old|m16": asdict(a), "both|m16": asdict(a)},
            }
        )
    )
    cache = tmp_path / "tuning.json"
    cache.write_text(
        json.dumps(
            {"NVIDIA H200|both|m16": asdict(b), "NVIDIA H200|new|m64": asdict(c), "NVIDIA H100|other|m16": asdict(c)}
        )
    )
    assert main(["--from-cache", str(cache), "--gpu", "NVIDIA H200", "--measured", "run x", "--out", str(out)]) == 0
    table = json.loads(target.read_text())
    assert table["configs"] == {"both|m16": asdict(b), "new|m64": asdict(c), "old|m16": asdict(a)}
    assert table["applies_to"] == ["NVIDIA H100"] and table["measured"].startswith("old; run x (merged from ")


def test_merge_cache_rejects_a_file_that_is_not_a_cache(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"NVIDIA H200|k": {"block_m": "x", "nope": 1}}')
    assert main(["--from-cache", str(bad), "--gpu", "NVIDIA H200", "--out", str(tmp_path)]) == 2
    assert "not a tuning cache" in capsys.readouterr().err
    assert main(["--from-cache", str(bad), "--out", str(tmp_path)]) == 2
    bad.write_text("[]")
    assert main(["--from-cache", str(bad), "--gpu", "NVIDIA H200", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("NVIDIA*"))


def test_merge_cache_keeps_a_broken_table_and_names_the_merge(tmp_path, capsys):
    cache = tmp_path / "tuning.json"
    cache.write_text(json.dumps({"NVIDIA H200|k|m16": asdict(GPU_CANDIDATES[0])}))
    target = table_path("NVIDIA H200", tmp_path)
    target.write_text("not json")
    assert main(["--from-cache", str(cache), "--gpu", "NVIDIA H200", "--out", str(tmp_path)]) == 2
    assert target.read_text() == "not json" and "not a tuning table" in capsys.readouterr().err
    target.unlink()
    assert main(["--from-cache", str(cache), "--gpu", "NVIDIA H200", "--out", str(tmp_path)]) == 0
    assert "merged from tuning.json" in json.loads(target.read_text())["measured"]


def test_merge_cache_for_another_gpu_changes_nothing(tmp_path, capsys):
    cache = tmp_path / "tuning.json"
    cache.write_text(json.dumps({"NVIDIA H200|k|m16": asdict(GPU_CANDIDATES[0])}))
    target = table_path("NVIDIA H100 80GB HBM3", tmp_path)
    target.write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "measured": "H100 run", "configs": {}}))
    assert main(["--from-cache", str(cache), "--gpu", "NVIDIA H100 80GB HBM3", "--out", str(tmp_path)]) == 2
    assert "no entries for" in capsys.readouterr().err and json.loads(target.read_text())["measured"] == "H100 run"
    target.unlink()
    target = table_path("NVIDIA H200", tmp_path)
    target.write_text(json.dumps({"gpu": "NVIDIA H200", "measured": "H200, torch 2.11", "configs": {}}))
    assert main(["--from-cache", str(cache), "--gpu", "NVIDIA H200", "--out", str(tmp_path)]) == 0
    assert json.loads(target.read_text())["measured"].startswith("H200, torch 2.11; merged from tuning.json")
