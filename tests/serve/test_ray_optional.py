"""Without the ``ray`` extra, ``p4q serve --backend ray`` and ``p4q classify --ray`` print one line and exit 2 (no
traceback); the single-process server stays the default; Ray option values are checked before anything starts."""

from __future__ import annotations

import sys

import pytest

from p4q_engine.cli import main
from p4q_engine.errors import ConfigError


@pytest.fixture
def no_ray(monkeypatch):
    """``import ray`` fails as it does without the extra (a None entry in sys.modules raises ImportError)."""
    for name in list(sys.modules):
        if name == "ray" or name.startswith("ray."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)


def test_serve_backend_ray_without_ray_is_one_line(no_ray, artifact, capsys):
    assert main(["serve", str(artifact), "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p4q: error: --backend ray needs Ray Serve") and "p4q-engine[ray]" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_classify_ray_without_ray_is_one_line(no_ray, artifact, tmp_path, capsys):
    args = ["classify", str(artifact), "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet"), "--ray"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("p4q: error: ") and "p4q-engine[ray]" in err and err.count("\n") == 1, err


def test_backend_flag_defaults_and_choices(capsys):
    from p4q_engine.cli import build_parser

    args = build_parser().parse_args(["serve", "m.p4q"])
    assert args.backend == "local" and args.replicas == 1 and args.ray_batching == "p4q"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "m.p4q", "--backend", "k8s"])
    assert e.value.code == 2 and "unknown backend 'k8s'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"replicas": 0}, "--replicas"),
        ({"http_replicas": 0}, "--http-replicas"),
        ({"gpus_per_replica": -1}, "--gpus-per-replica"),
        ({"batching": "fifo"}, "--ray-batching"),
    ],
)
def test_ray_options_are_validated(kwargs, message):
    from p4q_engine.serve.ray_backend import RayOptions

    with pytest.raises(ConfigError, match=message):
        RayOptions(**kwargs)
