"""The ``p4q`` command line: one-line errors with exit status 2, and the main commands end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p4q_engine.cli import main

REF_CKPT = Path(__file__).resolve().parents[1] / "p4q_engine" / "assets" / "p4q_ref_tiny.safetensors"
needs_ref = pytest.mark.skipif(not REF_CKPT.exists(), reason="reference checkpoint not present")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["ptq", "--bits", "5-5-8"], "5"),
        (["ptq", "--bits", "4-4"], "bit config"),
        (["ptq", "--observer", "magic"], "observer"),
        (["ptq", "--scope", "partial"], "scope"),
        (["ptq", "--dataset", "mnist"], "dataset"),
        (["eval", "--bits", "1-1-8"], "1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, needle, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("p4q: error:") and needle in lines[0]
    assert "Traceback" not in err


def test_missing_data_root_is_one_line(capsys):
    code, _, err = _run(["ptq", "--dataset", "cifar100", "--bits", "8-8-8", "--quiet"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "--data-root" in err and "Traceback" not in err


def test_missing_artifact_is_one_line(tmp_path, capsys):
    code, _, err = _run(["inspect", str(tmp_path / "nope.p4q")], capsys)
    assert code == 2 and err.startswith("p4q: error:") and err.count("\n") == 1


@needs_ref
def test_ptq_export_inspect_classify_on_reference(tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, err = _run(
        [
            "ptq",
            "--bits",
            "8-8-8",
            "--observer",
            "minmax",
            "--eval-size",
            "200",
            "--calib-batches",
            "2",
            "--quiet",
            "--device",
            "cpu",
            "--out",
            str(report),
        ],
        capsys,
    )
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["quantized"]["n"] == 200 and rep["fp32"]["n"] == 200
    assert 0.0 <= rep["quantized"]["top1"] <= 100.0
    assert rep["quantized"]["top1"] <= rep["quantized"]["top5"]

    art = tmp_path / "m.p4q"
    code, out, err = _run(
        [
            "export",
            "--bits",
            "4-4-8",
            "--observer",
            "minmax",
            "--calib-batches",
            "2",
            "--quiet",
            "--device",
            "cpu",
            "--out",
            str(art),
        ],
        capsys,
    )
    assert code == 0, err
    assert art.exists() and "wrote" in out

    code, out, err = _run(["inspect", str(art)], capsys)
    assert code == 0 and "visual.blocks.0.attn.in_proj" in out and "total" in out

    from p4q_engine.data.reference import ReferenceDataset

    raw = ReferenceDataset("test", size=2, transform=lambda im: im)
    paths = []
    for i in range(2):
        img, _ = raw[i]
        p = tmp_path / f"img{i}.png"
        img.save(p)
        paths.append(str(p))
    code, out, err = _run(["classify", str(art), *paths, "--top-k", "2", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert [r["image"] for r in res] == paths
    assert all(len(r["labels"]) == 2 and r["labels"][0] in raw.classnames for r in res)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, out, err = _run(["classify", str(art), str(bad)], capsys)
    assert code == 2 and str(bad) in err and err.count("\n") == 1


# ---------------------------------------------------------------- p4q train / eval --p4q / export --p4q
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--out", "x", "--loss", "mse"], "loss"),
        (["train", "--out", "x", "--method", "magic"], "method"),
        (["train", "--out", "x", "--adapter-bits", "3"], "adapter bits"),
        (["train", "--out", "x", "--bits", "fp32"], "quantized"),
        (["train", "--out", "x", "--no-prompt", "--no-adapter"], "nothing to train"),
        (["train", "--out", "x", "--n-ctx", "-1"], "n-ctx"),
        (["eval", "--p4q", "/nonexistent/dir"], "checkpoint"),
        (["export", "--p4q", "/nonexistent/dir", "--out", "x.p4q"], "checkpoint"),
    ],
)
def test_train_bad_options_exit_2(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], err


@needs_ref
def test_train_eval_export_classify_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("P4Q_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    common = [
        "--train-size",
        "100",
        "--eval-size",
        "50",
        "--calib-batches",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
    ]
    code, stdout, err = _run(
        ["train", "--bits", "4-4-8", "--epochs", "1", "--n-ctx", "4", "--out", str(out)] + common, capsys
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    trained_top1 = metrics["metrics"]["test"]["top1"]
    code, stdout, err = _run(["eval", "--p4q", str(out), "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    ev = json.loads(stdout)
    assert ev["split"] == "adapt_test" and ev["n"] == 50 and ev["top1"] == pytest.approx(trained_top1)
    art = tmp_path / "m.p4q"
    code, stdout, err = _run(["export", "--p4q", str(out), "--out", str(art)], capsys)
    assert code == 0 and art.is_file(), err
    code, stdout, err = _run(["inspect", str(art)], capsys)
    assert code == 0 and "adapter.fc1" in stdout
    code, stdout, err = _run(
        ["train", "--method", "qlp", "--bits", "4-4-8", "--out", str(tmp_path / "qlp")] + common, capsys
    )
    assert code == 0, err
    qlp = json.loads((tmp_path / "qlp" / "metrics.json").read_text())
    assert qlp["method"] == "qlp" and 0 < qlp["test"]["top1"] <= 100
