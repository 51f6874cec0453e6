"""``p4q inspect`` prints every artifact the engine loads and refuses - one line, exit 2 - every artifact it refuses.

It crashed with a traceback on artifacts the engine loaded (no ``model``, no ``classes.text_bits``) and on ones
the engine loaded while ignoring the bad part (a string ``logit_scale``, an int in the layer table).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from p4q_engine.artifact.format import Artifact, ArtifactError, load, save
from p4q_engine.cli import main
from p4q_engine.runtime.engine import Engine


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def base(folded) -> Artifact:
    return load(folded("4-4-8", "full").path)


def _write(base: Artifact, tmp_path: Path, edit) -> Path:
    man = copy.deepcopy(base.manifest)
    edit(man)
    path = tmp_path / "a.p4q"
    save(Artifact(man, dict(base.tensors)), path)
    return path


LOADABLE = {
    "no_model": (lambda m: m.pop("model"), "model: (not recorded)"),
    "no_text_bits": (lambda m: m["classes"].pop("text_bits"), "(text features at 8 bits)"),
    "no_class_dim": (lambda m: m["classes"].pop("dim"), "visual.blocks.1.mlp.c_proj"),
    "unicode_class_names": (
        lambda m: m["classes"]["names"].__setitem__(0, "caf\u00e9 \u732b \U0001f600"),
        "classes: 10",
    ),
}
REFUSED = {
    "string_logit_scale": (lambda m: m["classes"].update(logit_scale="100"), "classes.logit_scale"),
    "int_in_layer_table": (lambda m: m["linears"].update({"visual.extra": 5}), "linears['visual.extra']"),
    "int_layer_field": (lambda m: m["linears"]["visual.conv"].update(weight_bits=4.0), "weight_bits"),
    "unknown_layer": (
        lambda m: m["linears"].update({"visual.extra": dict(m["linears"]["visual.proj"])}),
        "is not a layer of this model",
    ),
}


@pytest.mark.parametrize("case", sorted(LOADABLE))
def test_inspect_prints_what_the_engine_loads(base, tmp_path, capsys, case):
    edit, needle = LOADABLE[case]
    path = _write(base, tmp_path, edit)
    Engine.load(path)
    code, out, err = _run(["inspect", str(path)], capsys)
    assert code == 0, err
    assert needle in out and "total" in out and "visual.blocks.0.attn.in_proj" in out


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_inspect_refuses_what_the_engine_refuses_in_one_line(base, tmp_path, capsys, case):
    edit, needle = REFUSED[case]
    path = _write(base, tmp_path, edit)
    with pytest.raises(ArtifactError, match="."):
        Engine.load(path)
    code, out, err = _run(["inspect", str(path)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("p4q: error:") and err.count("\n") == 1 and needle in err, err


def test_inspect_of_a_fifo_is_one_line(tmp_path, capsys):
    fifo = tmp_path / "pipe.p4q"
    os.mkfifo(fifo)
    code, _, err = _run(["inspect", str(fifo)], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a regular file" in err
