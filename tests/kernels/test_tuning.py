"""Tile-configuration selection and its on-disk cache (``p4q_engine.kernels.tuning``).

No GPU is needed: the GPU branch of ``pick_config`` is driven with a ``cuda`` device object, a fake device name
and a fake ``triton.testing.do_bench`` that returns a chosen time per configuration. Module state (the in-memory
table and its "file loaded" flag) is replaced per test so nothing leaks into the kernel tests.
"""

from __future__ import annotations

import json

import pytest
import torch
import triton.testing
from p4q_engine.kernels import tuning
from p4q_engine.kernels.tuning import GPU_CANDIDATES, INTERPRET_CONFIG, TileConfig, config_json, pick_config


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty tuning table backed by a file in ``tmp_path``."""
    path = tmp_path / "sub" / "tuning.json"
    monkeypatch.setenv("P4Q_TUNE_CACHE", str(path))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "_user", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "no-shipped-tables")
    return path


@pytest.fixture
def fake_gpu(monkeypatch, fresh_cache):
    """Take the GPU branch: interpreter off, a device named 'Fake GPU'."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return torch.device("cuda")


def test_interpreter_and_cpu_use_the_interpret_config(monkeypatch, fresh_cache):
    calls = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dev in (torch.device("cpu"), torch.device("cuda")):
        assert pick_config("qgemm", 50, 768, 768, 4, dev, bench=calls.append) == INTERPRET_CONFIG
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU device never tunes either
    assert pick_config("qgemm", 50, 768, 768, 4, torch.device("cpu"), bench=calls.append) == INTERPRET_CONFIG
    assert calls == [] and not fresh_cache.exists()


def test_interpret_config_fits_the_kernels():
    """BLOCK_K covers whole words of every plane (32 // width divides it, down to the 1-bit plane of 3-bit codes)."""
    for cfg in (INTERPRET_CONFIG, *GPU_CANDIDATES):
        assert cfg.block_k % 32 == 0
        assert all(b & (b - 1) == 0 for b in (cfg.block_m, cfg.block_n, cfg.block_k))


def test_key_buckets_m_by_powers_of_two(fake_gpu):
    assert [tuning._m_bucket(m) for m in (1, 16, 17, 50, 64, 65, 51200)] == [16, 16, 32, 64, 64, 128, 65536]
    key = tuning._key("qgemm", 50, 2304, 768, 3, fake_gpu)
    assert key == "Fake GPU|qgemm|m64|n2304|k768|b3"
    assert tuning._key("qgemm", 33, 2304, 768, 3, fake_gpu) == key  # same bucket, same entry
    assert tuning._key("qgemm", 50, 2304, 768, 3, torch.device("cpu")).startswith("cpu|")


def test_cache_file_roundtrip(fresh_cache, monkeypatch):
    a, b = TileConfig(128, 64, 128, 8, 4, 4), TileConfig(16, 64, 256, kernel="tma", swap=True)
    tuning._user.update({"Fake GPU|qgemm|m64|n768|k768|b4": a, "Fake GPU|qgemm|m65536|n768|k3072|b2": b})
    tuning._save_file()  # creates the parent directory
    data = json.loads(fresh_cache.read_text())
    assert data["Fake GPU|qgemm|m64|n768|k768|b4"] == {
        "block_m": 128,
        "block_n": 64,
        "block_k": 128,
        "group_m": 8,
        "num_warps": 4,
        "num_stages": 4,
        "kernel": "ptr",
        "swap": False,
        "occupancy": 1,
    }
    assert data["Fake GPU|qgemm|m65536|n768|k3072|b2"]["swap"] is True
    assert not list(fresh_cache.parent.glob("*.tmp"))  # written atomically (temp file + rename)

    monkeypatch.setattr(tuning, "_memory", {})  # a new process
    monkeypatch.setattr(tuning, "_user", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    tuning._load_file()
    assert tuning._memory == {"Fake GPU|qgemm|m64|n768|k768|b4": a, "Fake GPU|qgemm|m65536|n768|k3072|b2": b}
    tuning._memory.clear()
    tuning._load_file()  # loads once per process
    assert tuning._memory == {}


def test_withdrawn_warp_specialized_entries_are_dropped_not_the_file(fresh_cache, tmp_path):
    """A cache or table written by the release with warp-specialized tiles (``"ws"`` fields, ``-ws`` keys; they
    faulted on an H200 and were withdrawn) loads without those entries, which are tuned again; the rest stays."""
    plain = {"block_m": 32, "block_n": 64, "block_k": 128, "group_m": 8, "num_warps": 4, "num_stages": 4}
    data = {
        "G|qgemm-direct8-requant|m64|n768|k768|b8": plain,
        "G|qgemm-direct8-requant-ws|m64|n768|k768|b8": plain,
        "G|qgemm-direct8-requant|m65536|n768|k768|b8": {**plain, "kernel": "tma", "ws": True},
    }
    assert list(tuning.config_entries(data)) == ["G|qgemm-direct8-requant|m64|n768|k768|b8"]
    with pytest.raises(TypeError):  # any other unknown field is still an error (the file is skipped)
        tuning.config_entries({"G|x|m64|n1|k1|b8": {**plain, "bogus": 1}})
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(json.dumps(data))
    tuning._load_file()
    assert set(tuning._user) == {"G|qgemm-direct8-requant|m64|n768|k768|b8"}
    (tmp_path / "G.json").write_text(
        json.dumps({"gpu": "G", "measured": "x", "configs": {k[2:]: v for k, v in data.items()}})
    )
    assert list(tuning.load_shipped(tmp_path)) == ["G|qgemm-direct8-requant|m64|n768|k768|b8"]


def test_cache_file_from_before_the_kernel_field(fresh_cache):
    """Entries written before ``TileConfig.kernel`` existed still load, as pointer-kernel configurations."""
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(
        json.dumps(
            {
                "G|qgemm|m64|n768|k768|b4": {
                    "block_m": 32,
                    "block_n": 64,
                    "block_k": 128,
                    "group_m": 8,
                    "num_warps": 4,
                    "num_stages": 4,
                }
            }
        )
    )
    tuning._load_file()
    assert tuning._memory == {"G|qgemm|m64|n768|k768|b4": TileConfig(32, 64, 128, 8, 4, 4, "ptr")}


@pytest.mark.parametrize("content", ["{not json", '{"k": {"block_m": 1}}', "[1, 2]"])
def test_unreadable_cache_file_is_ignored(fresh_cache, content):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(content)
    tuning._load_file()
    assert tuning._memory == {}


def test_unwritable_cache_path_is_ignored(fresh_cache, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("P4Q_TUNE_CACHE", str(blocker / "tuning.json"))  # parent is a file: mkdir fails
    tuning._memory["k"] = INTERPRET_CONFIG
    tuning._save_file()  # no exception: only costs re-tuning later


def test_gpu_branch_tunes_once_and_persists(fake_gpu, fresh_cache, monkeypatch):
    """The fastest fitting candidate wins; failing candidates are skipped; the winner is cached in memory and on
    disk, and a new process reads it back without benchmarking."""
    times = {c: 10.0 + i for i, c in enumerate(GPU_CANDIDATES)}
    fastest_fitting = TileConfig(32, 64, 128, 8, 4, 4)
    too_tall = TileConfig(128, 128, 128, 8, 8, 3)
    broken = TileConfig(64, 64, 128, 8, 4, 4)
    times[fastest_fitting] = 2.0
    times[too_tall] = 1.0  # faster, but BLOCK_M = 128 > the M = 50 bucket (64): never benchmarked
    benched: list[TileConfig] = []

    def bench(cfg: TileConfig) -> None:
        benched.append(cfg)

    def do_bench(fn, warmup=None, rep=None, return_mode=None):
        fn()
        if benched[-1] == broken:
            raise RuntimeError("out of shared memory")
        return times[benched[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    cfg = pick_config("qgemm", 50, 768, 768, 4, fake_gpu, bench)
    assert cfg == fastest_fitting
    assert too_tall not in benched and broken in benched
    assert all(c.block_m <= 64 for c in benched)
    n = len(benched)
    assert pick_config("qgemm", 60, 768, 768, 4, fake_gpu, bench) == cfg and len(benched) == n  # same bucket
    # the winner alone is on disk (field by field format: test_cache_file_roundtrip)
    assert json.loads(fresh_cache.read_text()) == {"Fake GPU|qgemm|m64|n768|k768|b4": config_json(fastest_fitting)}

    monkeypatch.setattr(tuning, "_memory", {})  # a new process: the file answers, no benchmark
    monkeypatch.setattr(tuning, "_user", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    assert pick_config("qgemm", 50, 768, 768, 4, fake_gpu, bench) == cfg and len(benched) == n


def test_gpu_branch_without_bench_returns_first_fitting_candidate(fake_gpu, fresh_cache):
    assert pick_config("qgemm", 50, 768, 768, 4, fake_gpu) == next(c for c in GPU_CANDIDATES if c.block_m <= 64)
    assert pick_config("qgemm", 51200, 768, 768, 4, fake_gpu) == GPU_CANDIDATES[0]
    assert tuning._memory == {}  # an untuned guess is not cached


def test_autotune_off_takes_first_fitting_candidate(fake_gpu, fresh_cache, monkeypatch):
    """P4Q_AUTOTUNE=0: no timing; the first candidate that fits M and runs once is used, nothing is cached."""
    monkeypatch.setenv("P4Q_AUTOTUNE", "0")
    calls: list = []
    cfg = pick_config("qgemm", 50, 768, 768, 4, fake_gpu, lambda c: calls.append(c))
    assert cfg == next(c for c in GPU_CANDIDATES if c.block_m <= 64) and cfg != GPU_CANDIDATES[0]
    assert calls == [cfg] and tuning._memory == {} and not fresh_cache.exists()


def test_autotune_off_skips_a_candidate_that_does_not_run(fake_gpu, fresh_cache, monkeypatch):
    """A tile that needs more shared memory than the GPU has (it raises at launch) is skipped, not returned."""
    monkeypatch.setenv("P4Q_AUTOTUNE", "0")
    fitting = [c for c in GPU_CANDIDATES if c.block_m <= 64]

    def bench(c):
        if c == fitting[0]:
            raise RuntimeError("out of resource: shared memory")

    assert pick_config("qgemm", 50, 768, 768, 4, fake_gpu, bench) == fitting[1]


def _write_table(directory, gpu: str, configs: dict, applies_to=()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{gpu.replace(' ', '_')}.json").write_text(
        json.dumps({"gpu": gpu, "applies_to": list(applies_to), "measured": "test", "configs": configs})
    )


def test_shipped_table_answers_before_tuning_and_is_not_copied_to_the_cache(fake_gpu, fresh_cache, monkeypatch):
    """A key in a shipped table (here for 'Fake GPU' via another GPU's table that names it) is used without any
    benchmark; the cache file only ever receives what this machine tuned; a cache entry overrides the table."""
    shipped = tuning.SHIPPED_DIR
    tile = TileConfig(64, 128, 128, 8, 4, 3, "tma", swap=True)
    _write_table(shipped, "Other GPU", {"qgemm|m64|n768|k768|b4": {**tile.__dict__}}, applies_to=["Fake GPU"])
    (shipped / "broken.json").write_text("{not json")  # skipped
    benched: list = []
    assert pick_config("qgemm", 50, 768, 768, 4, fake_gpu, benched.append) == tile and benched == []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    other = pick_config("qgemm", 50, 768, 3072, 4, fake_gpu, benched.append)  # not shipped: tuned and cached
    assert benched and list(json.loads(fresh_cache.read_text())) == ["Fake GPU|qgemm|m64|n768|k3072|b4"]
    assert other == next(c for c in GPU_CANDIDATES if c.block_m <= 64)  # equal times: the first fitting wins

    fresh_cache.write_text(json.dumps({"Fake GPU|qgemm|m64|n768|k768|b4": {**INTERPRET_CONFIG.__dict__}}))
    monkeypatch.setattr(tuning, "_memory", {})  # a new process with a cache entry for the shipped key
    monkeypatch.setattr(tuning, "_user", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    assert pick_config("qgemm", 50, 768, 768, 4, fake_gpu, benched.append) == INTERPRET_CONFIG


def test_shipped_tables_in_the_package_load():
    """Every table the package ships parses into configurations the kernels know (kernel kind, power-of-two
    tiles), keyed by what ``_key`` builds."""
    real = tuning.Path(tuning.__file__).with_name("tuned")
    files = sorted(real.glob("*.json"))
    table = tuning.load_shipped(real)
    for f in files:
        data = json.loads(f.read_text())
        assert data["configs"] and data["gpu"] and data["measured"]
    for key, cfg in table.items():
        gpu, name, m, n, k, b = key.split("|")
        assert m.startswith("m") and n.startswith("n") and k.startswith("k") and b.startswith("b")
        assert cfg.kernel in ("ptr", "tma", "attn", "attn-short", "ln")
        assert all(v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k))


def test_no_candidate_fits_m_tries_the_smallest_tiles_first(fake_gpu, fresh_cache, monkeypatch):
    """P4Q_QGEMM_KERNEL=tma at M = 4: every TMA tile is taller than M's bucket. The smallest tile runs first (the
    largest needed 278 KB of shared memory on an H200), and a failing one is skipped."""
    monkeypatch.setenv("P4Q_AUTOTUNE", "0")
    tma = tuple(c for c in GPU_CANDIDATES if c.kernel == "tma")
    tried: list = []

    def bench(c):
        tried.append(c)
        if len(tried) == 1:
            raise RuntimeError("out of resource: shared memory")

    cfg = pick_config("qgemm-tma", 4, 512, 768, 8, fake_gpu, bench, tma)
    sizes = [c.block_m * c.block_n for c in tried]
    assert (
        sizes == sorted(sizes)
        and cfg == tried[1]
        and tried[0].block_m * tried[0].block_n == min(c.block_m * c.block_n for c in tma)
    )


def test_table_file_round_trips_through_load_shipped(tmp_path):
    """What benchmarks/tune_tables.py writes is what the package loads: this GPU's entries only, merged over the
    previous file (its other entries and applies_to kept, re-tuned keys replaced)."""
    new = TileConfig(64, 128, 128, 8, 4, 3, swap=True)
    old = TileConfig(32, 32, 128, 8, 2, 4)
    previous = {"gpu": "G 1", "applies_to": ["G 2"], "measured": "x", "configs": {"a|m64|n8|k8|b4": {**old.__dict__}}}
    tuned = {"G 1|b|m64|n8|k8|b4": new, "G 1|a|m64|n8|k8|b4": new, "Other|c|m64|n8|k8|b4": old}
    table = tuning.table_file("G 1", tuned, "today", previous)
    assert table["applies_to"] == ["G 2"] and set(table["configs"]) == {"a|m64|n8|k8|b4", "b|m64|n8|k8|b4"}
    path = tuning.table_path("G 1", tmp_path)
    assert path.name == "G_1.json"
    path.write_text(json.dumps(table))
    loaded = tuning.load_shipped(tmp_path)
    assert loaded == {f"{g}|{k}": new for g in ("G 1", "G 2") for k in ("a|m64|n8|k8|b4", "b|m64|n8|k8|b4")}


def test_forget_makes_shipped_keys_tune_again(fake_gpu, fresh_cache, monkeypatch):
    """``forget`` drops the entries its predicate names (kernel, M bucket) and no others; a dropped key is then
    tuned with the current candidates (how ``tune_tables.py --retune-m-max`` reaches new ones)."""
    tile = TileConfig(64, 128, 128, 8, 4, 3)
    _write_table(
        tuning.SHIPPED_DIR,
        "Fake GPU",
        {
            "qgemm|m64|n768|k768|b8": {**tile.__dict__},
            "qgemm|m4096|n768|k768|b8": {**tile.__dict__},
            "ln-quant|m64|n768|k0|b8": {**tile.__dict__},
        },
    )
    assert tuning.forget(lambda name, m: name.startswith("qgemm") and m <= 1024) == 1
    assert pick_config("qgemm", 3000, 768, 768, 8, fake_gpu) == tile
    assert pick_config("ln-quant", 50, 768, 0, 8, fake_gpu) == tile
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: (fn(), 1.0)[1], raising=False)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    benched: list = []
    pick_config("qgemm", 50, 768, 768, 8, fake_gpu, benched.append)
    assert benched  # tuned again, not answered from the table


def test_a_candidate_that_raises_is_skipped_and_logged(fake_gpu, fresh_cache, monkeypatch, caplog):
    """The tuner skips a failing candidate; a non-resource error is a WARNING naming the key and the tile."""
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    cands = (TileConfig(16, 32, 64), TileConfig(32, 32, 64))

    def bench(cfg):
        if cfg.block_m == 16:
            raise IndexError("tuple index out of range")

    with caplog.at_level("INFO", logger="p4q_engine.kernels.tuning"):
        assert pick_config("qgemm", 50, 768, 768, 8, fake_gpu, bench, cands) == cands[1]
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "IndexError" in warned[0].getMessage() and "m64" in warned[0].getMessage()
