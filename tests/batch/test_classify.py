"""The local dataset job (``p4q classify --input ... --output results.parquet``): rows equal ``Engine.classify``
image for image, per-image failures are error rows, bad inputs are one typed error, and the CLI's old form still
works."""

from __future__ import annotations

from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from p4q_engine.batch.classify import COLUMNS, JobOptions, run_local  # noqa: E402
from p4q_engine.batch.sources import CHUNK, FileUnit, resolve  # noqa: E402
from p4q_engine.cli import main  # noqa: E402
from p4q_engine.errors import DatasetError  # noqa: E402
from tests.batch.conftest import BAD_FILES, MAX_FILE_BYTES, N_IMAGES, assert_matches, expected_rows  # noqa: E402

OPTIONS = JobOptions(max_file_bytes=MAX_FILE_BYTES, batch_size=32)


def _run(engine, spec, out: Path, options: JobOptions = OPTIONS) -> list[dict]:
    result = run_local(engine, str(spec), str(out), options, progress=False)
    rows = pq.read_table(out).to_pylist()
    assert result.images == len(rows)
    return rows


def test_directory_rows_equal_engine_classify_and_bad_files_are_rows(engine, dataset, tmp_path):
    rows = _run(engine, dataset, tmp_path / "out.parquet")
    assert pq.read_schema(tmp_path / "out.parquet").names == list(COLUMNS)
    assert [r["index"] for r in rows] == list(range(N_IMAGES + len(BAD_FILES)))  # input order
    by_name = {Path(r["source"]).name: r for r in rows}
    assert "README.txt" not in by_name  # only image extensions are taken from a directory
    for name, why in BAD_FILES.items():
        row = by_name[name]
        assert row["error"] and why in row["error"] and name in row["error"], row
        assert row["label"] is None and row["labels"] == [] and row["probs"] == []
    good = [r for r in rows if r["error"] is None]
    assert len(good) == N_IMAGES
    assert_matches(good, expected_rows(engine, [r["source"] for r in good]))


def test_units_are_bounded_chunks(dataset):
    src = resolve(str(dataset))
    assert src.count == N_IMAGES + len(BAD_FILES)
    assert all(isinstance(u, FileUnit) and len(u.paths) <= CHUNK for u in src.units)
    assert sum(len(u.paths) for u in src.units) == src.count


def test_glob_and_single_file(engine, dataset, tmp_path):
    rows = _run(engine, f"{dataset}/img_00[0-4]*.png", tmp_path / "g.parquet")
    assert len(rows) == len(list(dataset.glob("img_00[0-4]*.png"))) > 0
    assert_matches(rows, expected_rows(engine, [r["source"] for r in rows]))
    one = _run(engine, dataset / "img_0001.png", tmp_path / "one.parquet")
    assert len(one) == 1 and one[0]["error"] is None


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=50)
    return path


def test_parquet_image_bytes_and_path_columns(engine, dataset, tmp_path):
    files = sorted(dataset.glob("img_*.png"))[:80]
    blobs = [f.read_bytes() for f in files]
    cells = blobs[:40] + [b"garbage", None] + blobs[40:]
    src = _parquet(tmp_path / "bytes.parquet", {"image": pa.array(cells, pa.binary())})
    rows = _run(engine, src, tmp_path / "o1.parquet")
    assert [r["source"] for r in rows] == [f"{src}#{i}" for i in range(len(cells))]
    assert "cannot decode" in rows[40]["error"] and "no bytes" in rows[41]["error"]
    good = rows[:40] + rows[42:]
    assert_matches(good, expected_rows(engine, blobs))
    # Hugging Face datasets' Image feature: a struct with "bytes" and "path"
    hf = pa.array(
        [{"bytes": b, "path": None} for b in blobs[:5]], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    rows = _run(engine, _parquet(tmp_path / "hf.parquet", {"image": hf}), tmp_path / "o2.parquet")
    assert_matches(rows, expected_rows(engine, blobs[:5]))
    # a path column, relative to the Parquet file's directory, with a missing file
    rel = [str(f) for f in files[:3]] + ["no/such/file.png"]
    rows = _run(engine, _parquet(tmp_path / "paths.parquet", {"path": rel}), tmp_path / "o3.parquet")
    assert_matches(rows[:3], expected_rows(engine, rel[:3]))
    assert rows[3]["source"] == "no/such/file.png" and "cannot read" in rows[3]["error"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no such file"),
        (lambda d: str(d / "*.nothing"), "matches no files"),
        (lambda d: _bad_bytes(d / "broken.parquet"), "not a readable Parquet file"),
        (lambda d: _parquet(d / "cols.parquet", {"pixels": [b"x"], "caption": ["a"]}), "no image column"),
        (lambda d: _empty_dir(d / "empty"), "no image files"),
    ],
)
def test_bad_inputs_are_one_typed_error(make, message, tmp_path):
    with pytest.raises(DatasetError, match=message):
        resolve(str(make(tmp_path)))


def _bad_bytes(path: Path) -> Path:
    path.write_bytes(b"PAR1 this is not parquet")
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("x")
    return path


def test_output_is_complete_or_absent(engine, tmp_path):
    out = tmp_path / "never.parquet"
    with pytest.raises(DatasetError):
        run_local(engine, str(tmp_path / "missing"), str(out), OPTIONS, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".never.parquet.*"))


def test_cli_dataset_form_and_old_form(artifact, dataset, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    args = ["classify", str(artifact), "--input", str(dataset), "--output", str(out), "--device", "cpu"]
    assert main([*args, "--no-progress", "--top-k", "3", "--labels", "class 1,class 2,class 3"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert {l for r in rows for l in r["labels"]} <= {"class 1", "class 2", "class 3"}
    assert "wrote" in capsys.readouterr().err
    assert main(["classify", str(artifact), str(dataset / "img_0001.png"), "--json"]) == 0  # the old form
    assert '"labels"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--input", "x"], "needs both --input and --output"),
        ([], "needs image files, or --input"),
        (["img.png", "--input", "x", "--output", "y.parquet"], "either image files or --input"),
        (["--input", "/nonexistent", "--output", "y.parquet"], "no such file"),
    ],
)
def test_cli_errors_are_one_line(artifact, extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["classify", str(artifact), *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p4q: error: ") and message in err and err.count("\n") == 1, err


def test_lying_header_is_an_error_row_not_a_crash(engine, tmp_path):
    """A PNG whose header declares 60000x60000 (its data is a few bytes): refused from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    d = tmp_path / "liar"
    d.mkdir()
    (d / "liar.png").write_bytes(blob)
    rows = _run(engine, d, tmp_path / "l.parquet")
    assert rows[0]["label"] is None and "liar.png" in rows[0]["error"]  # Pillow's bomb check or ours, from the header
