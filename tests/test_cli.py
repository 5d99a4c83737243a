"""The command line as a whole: help, version, fetch through the CLI, info."""
from __future__ import annotations

import hashlib

import pytest

from conftest import call_fcnify, run_fcnify
from test_fetch import PAYLOAD, PAYLOAD_SHA1, server  # noqa: F401 (fixture)

COMMANDS = ["convert", "verify", "info", "classify-map", "fetch", "doctor", "demo"]


def test_version():
    """`fcnify --version` prints the package version."""
    import fcnify
    run = call_fcnify("--version")
    assert run.code == 0 and run.out.strip() == f"fcnify {fcnify.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_text(command):
    """Every command's --help explains it (and, except doctor/demo, shows an example)."""
    run = call_fcnify(command, "--help")
    assert run.code == 0
    assert f"Usage: fcnify {command}" in run.out
    if command not in ("doctor", "demo"):
        assert "Example" in run.out


def test_classify_map_help_grouped():
    """classify-map's --help lists every option under a purpose heading, each with its help line."""
    import click
    from fcnify.cli import OPTION_GROUPS, cli
    command = cli.commands["classify-map"]
    run = call_fcnify("classify-map", "--help")
    assert run.code == 0
    headings = list(OPTION_GROUPS["classify-map"])
    positions = [run.out.index(f"\n{h}:\n") for h in headings]
    assert positions == sorted(positions)
    assert "Other options:" not in run.out
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts[0]} has no help line"
            assert param.opts[0] in run.out


def _fake_caffe_root(tmp_path, url: str, sha1: str):
    root = tmp_path / "caffe"
    readme = root / "models" / "bvlc_reference_caffenet" / "readme.md"
    readme.parent.mkdir(parents=True)
    readme.write_text(f"---\nname: test\ncaffemodel: bvlc_reference_caffenet.caffemodel\n"
                      f"caffemodel_url: {url}\nsha1: {sha1}\n---\n\ntext\n")
    return root


def test_fetch_command(tmp_path, server):  # noqa: F811
    """`fcnify fetch caffenet` downloads into the models folder and checks the SHA-1."""
    url, _ = server
    root = _fake_caffe_root(tmp_path, url, PAYLOAD_SHA1)
    models = tmp_path / "models"
    run = run_fcnify("fetch", "caffenet", env={"FCNIFY_CAFFE_SOURCE": str(root),
                                               "FCNIFY_MODELS": str(models)})
    assert run.code == 0, run.err
    target = models / "bvlc_reference_caffenet" / "bvlc_reference_caffenet.caffemodel"
    assert hashlib.sha1(target.read_bytes()).hexdigest() == PAYLOAD_SHA1
    assert "verified" in run.out


def test_fetch_command_bad_checksum(tmp_path, server):  # noqa: F811
    """A checksum mismatch is one line on stderr, exit 2, and no file in the models folder."""
    url, _ = server
    root = _fake_caffe_root(tmp_path, url, "1" * 40)
    models = tmp_path / "models"
    run = run_fcnify("fetch", "caffenet", env={"FCNIFY_CAFFE_SOURCE": str(root),
                                               "FCNIFY_MODELS": str(models)})
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1 and "sha1" in run.err.lower()
    assert not list(models.rglob("*.caffemodel"))


def test_convert_without_weights_says_fetch(tmp_path, monkeypatch):
    """`fcnify convert` with no CaffeNet weights points at `fcnify fetch caffenet`."""
    monkeypatch.setenv("FCNIFY_MODELS", str(tmp_path / "empty"))
    run = call_fcnify("convert", "--out", tmp_path / "x")
    assert run.code == 2
    assert "fcnify fetch caffenet" in run.err and len(run.err.strip().splitlines()) == 1


def test_info_on_digits():
    """`fcnify info` on the shipped digits net reports its 4-px stride and 28-px window."""
    from fcnify.models import find_model
    run = call_fcnify("info", find_model("digits").model_def, "--input-size", "480x640")
    assert run.code == 0, run.err
    assert "stride:          4 px" in run.out and "window per cell: 28x28 px" in run.out
    assert "at 480x640: 114x154 cells" in run.out  # sizes height x width, as --input-size


def test_caffe_logs_quiet_unless_verbose(tmp_path):
    """Caffe's glog lines stay off stderr by default and come back with --verbose."""
    quiet = run_fcnify("convert", "--model", "digits", "--out", tmp_path / "q")
    assert quiet.code == 0, quiet.err
    assert "net.cpp" not in quiet.err and quiet.err.strip() == ""
    loud = run_fcnify("--verbose", "convert", "--model", "digits", "--out", tmp_path / "v")
    assert loud.code == 0, loud.err
    assert "net.cpp" in loud.err  # glog's "Initializing net from parameters" lines
