"""Issue 21, item 4: every file a command writes goes through :mod:`kat_timm.files`, and no write replaces what it
must not: a device node, a FIFO or a socket is refused (a rename would replace the node with a regular file; a plain
write to a FIFO blocks), a symbolic link is written through (the link stays), and an output that is one of the
command's own inputs is refused (``kat-timm export --checkpoint victim.pth -o victim.pth`` overwrote the checkpoint).

The sweep runs each command in-process with each kind of node at its output path. All of them are refused before
any model is built or any file read, so the whole sweep takes about a second. Device nodes are made with
``os.mknod`` (the tests run as root, as CI does): a character device with /dev/null's numbers (1, 3), a block
device with a loop device's (7, 0), created in tmp_path; nothing is ever opened through them.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import stat
from pathlib import Path

import pytest

from kat_timm.files import OutputPathError, edit_atomically, output_target

ROOT = Path(__file__).resolve().parents[1]
VICTIM_BYTES = b"the command's input: must survive\n"


def make_node(kind: str, path: Path, victim: Path) -> None:
    """Create a node of ``kind`` at ``path`` (``victim``: the command's input file, for the input kinds)."""
    if kind == "character device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "block device":
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o600)
    elif kind == "link to a character device":
        os.mknod(path.with_name("device"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
        path.symlink_to(path.with_name("device"))
    elif kind == "link to a fifo":
        os.mkfifo(path.with_name("pipe"))
        path.symlink_to(path.with_name("pipe"))
    elif kind == "link to the input":
        path.symlink_to(victim)
    elif kind == "hard link to the input":
        os.link(victim, path)
    else:
        raise AssertionError(kind)


KINDS = ("character device", "block device", "fifo", "socket", "link to a character device", "link to a fifo",
         "link to the input", "hard link to the input")


def _snapshot(folder: Path):
    """{name: (file type, inode, bytes of a regular file)} of everything in ``folder``, links not followed."""
    found = {}
    for path in sorted(folder.iterdir()):
        info = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        found[path.name] = (stat.S_IFMT(info.st_mode), info.st_ino, data)
    return found


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code(call) -> int:
    """The exit code of ``call()``: its return value, or the code of the SystemExit argparse raises."""
    try:
        return call()
    except SystemExit as exit:
        return exit.code


# command -> (output file name, function(output path, input file) -> exit code). Each names the input file where
# the command takes one.
def _export(output, victim):
    from kat_timm.cli import export

    return export.main(["kat_tiny", "--checkpoint", str(victim), "-o", str(output)])


def _plot(output, victim):
    from kat_timm.cli import plot

    return plot.main(["--checkpoint", str(victim), "-o", str(output)])


def _validate(output, victim):
    from kat_timm.cli import validate

    return validate.main(["--data-dir", str(victim.parent), "--checkpoint", str(victim), "--results-file",
                          str(output), "--workers", "0", "--device", "cpu"])


def _benchmark_json(output, victim):
    from kat_timm.benchmark import benchmark_parser, parse_benchmark_args

    parser = benchmark_parser("benchmark", batch_help="", reps_help="", quick_help="")
    parse_benchmark_args(parser, ["--device", "cpu", "--json", str(output)])
    return 0


def _kernel_report_json(output, victim):
    pytest.importorskip("triton", reason="scripts/kernel_report.py needs triton (installed with torch on Linux)")
    return _load_script("kernel_report").main(["--json", str(output)])


def _fit_rational(output, victim):
    return _load_script("fit_rational").main(["gelu", "--output", str(output)])


def _convert_checkpoint(output, victim):
    return _load_script("convert_checkpoint").main([str(victim), "-o", str(output.parent), "--force"])


COMMANDS = {
    "kat-timm export -o": ("model.onnx", _export),
    "kat-timm plot -o": ("plot.png", _plot),
    "kat-validate --results-file": ("results.json", _validate),
    "scripts/benchmark_*.py --json": ("bench.json", _benchmark_json),
    "scripts/kernel_report.py --json": ("report.json", _kernel_report_json),
    "scripts/fit_rational.py --output": ("table.json", _fit_rational),
    "scripts/convert_checkpoint.py -o DIR": ("model.safetensors", _convert_checkpoint),
}
# Commands with no input file that a path could name.
NO_INPUT = {"scripts/benchmark_*.py --json", "scripts/kernel_report.py --json", "scripts/fit_rational.py --output"}


@pytest.fixture
def blas_env(monkeypatch):
    """fit_rational.py sets BLAS thread variables at import: keep them from leaking into later tests."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


CASES = [(command, kind) for command in COMMANDS for kind in KINDS if not ("input" in kind and command in NO_INPUT)]


@pytest.mark.parametrize("command,kind", CASES)
def test_no_command_replaces_a_node_or_overwrites_its_input(command, kind, tmp_path, capsys, blas_env):
    name, run = COMMANDS[command]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    victim = inputs / "victim.pth"
    victim.write_bytes(VICTIM_BYTES)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    make_node(kind, outputs / name, victim)
    before = _snapshot(outputs), _snapshot(inputs)

    code = _exit_code(lambda: run(outputs / name, victim))

    err = capsys.readouterr().err
    assert code == 2, f"{command} onto a {kind}: exit {code}, {err}"
    assert (_snapshot(outputs), _snapshot(inputs)) == before, f"{command} changed the nodes or the input"
    assert victim.read_bytes() == VICTIM_BYTES
    lines = err.strip().splitlines()
    assert len(lines) == 1 or "usage:" in lines[0], f"one line, not a traceback: {err}"
    if "input" in kind:
        assert "victim.pth itself, which writing would destroy; give another path" in err, err
    else:
        described = kind.replace("link to a ", "").replace("fifo", "FIFO")
        assert f"is a {described}" in err and "not a regular file; give the path of a file to write" in err, err


def test_export_over_its_own_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    """The reported case word for word: ``kat-timm export --checkpoint victim.pth -o victim.pth``."""
    from kat_timm.cli import main

    victim = tmp_path / "victim.pth"
    victim.write_bytes(VICTIM_BYTES)
    assert main(["export", "--checkpoint", str(victim), "-o", str(victim)]) == 2
    assert capsys.readouterr().err == (f"kat-timm export: error: -o {victim} is the --checkpoint file {victim} "
                                       f"itself, which writing would destroy; give another path\n")
    assert victim.read_bytes() == VICTIM_BYTES


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path):
    """benchmark --json through a link (a real write): the target gets the file, the link is still the link."""
    from kat_timm.benchmark import write_json

    target = tmp_path / "data" / "results.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    write_json(str(link), rows=[1, 2])
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == '{\n  "rows": [\n    1,\n    2\n  ]\n}'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "latest.json", "results.json"], "no partial left"


def test_a_dangling_link_is_written_at_its_target(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "new.json")
    written = edit_atomically(link, lambda partial: Path(partial).write_text("x"), start_from_current=False)
    assert written == str(tmp_path / "new.json") and link.is_symlink() and (tmp_path / "new.json").read_text() == "x"


def test_a_chain_of_links_is_followed_to_the_end(tmp_path):
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (tmp_path / "b").symlink_to(tmp_path / "null")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    with pytest.raises(OutputPathError, match=rf"^out is a character device \({tmp_path / 'null'}\), not a regular"):
        output_target(tmp_path / "a", label="out")


def test_a_link_loop_and_a_folder_are_one_line_errors(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OutputPathError, match="^out: cannot write there"):
        output_target(tmp_path / "a", label="out")
    with pytest.raises(OutputPathError, match=r"^out is a folder, not a regular file"):
        output_target(tmp_path, label="out")


def test_an_input_that_does_not_exist_yet_is_compared_by_path(tmp_path):
    with pytest.raises(OutputPathError, match="is the --in file"):
        output_target(tmp_path / "x" / ".." / "f", {"--in": tmp_path / "f"})
    assert output_target(tmp_path / "g", {"--in": tmp_path / "f", "--none": None}) == str(tmp_path / "g")


def test_a_refused_edit_writes_nothing(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    calls = []
    with pytest.raises(OutputPathError, match="is a FIFO"):
        edit_atomically(tmp_path / "pipe", calls.append)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_real_socket_is_refused(tmp_path):
    """A bound Unix socket (not only a node made by mknod)."""
    server = socket.socket(socket.AF_UNIX)
    path = tmp_path / "s"
    server.bind(str(path))
    try:
        with pytest.raises(OutputPathError, match="is a socket"):
            output_target(path)
    finally:
        server.close()


def test_a_link_into_a_missing_folder_is_refused_before_anything_is_written(tmp_path):
    """The rename target would be in a folder that does not exist: refused in one line naming where the link leads,
    not an ENOENT after the other outputs of the command are written."""
    (tmp_path / "out.json").symlink_to(tmp_path / "gone" / "x.json")
    with pytest.raises(OutputPathError, match=rf"^out: a symbolic link to {tmp_path / 'gone' / 'x.json'}, whose "
                                              rf"folder {tmp_path / 'gone'} does not exist; create it or give "
                                              "another path$"):
        output_target(tmp_path / "out.json", label="out")
