"""Writing the user's own files: params.yaml keeps its permissions, a read-only one is
refused in one line, and one bind-mounted on its own (Docker's -v file:file) is written
in place. An --out file that could not be written is refused before the work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import in_namespace, unshare_works

from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, check_out_file, rewrite_user_file, shown

REPO = Path(__file__).resolve().parents[1]


def test_rewriting_keeps_the_files_permissions(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o640)
    rewrite_user_file(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_weights_in_a_written_folder_get_the_umasks_mode_like_its_other_files(tmp_path, umask):
    """safetensors >= 0.8 writes its files 0600 whatever the umask (safetensors#782), so a
    model folder's weights alone would be unreadable to a container's or a server's user."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "merged") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "merged").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_a_read_only_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("a: 1\n")
    path.chmod(0o444)
    with pytest.raises(TunelineError, match="params.yaml is read-only.*chmod u\\+w params.yaml"):
        rewrite_user_file(path, "a: 2\n")
    assert path.read_text() == "a: 1\n" and path.stat().st_mode & 0o777 == 0o444


def test_a_file_mounted_on_its_own_is_written_in_place(tmp_path):
    if not unshare_works():
        pytest.skip("needs `unshare -rm` (mount namespaces) to bind-mount a file")
    path = tmp_path / "params.yaml"
    path.write_text("a: 1\n")
    code = "from pathlib import Path; from tuneline.io import rewrite_user_file; rewrite_user_file(Path('params.yaml'), 'a: 2\\n')"
    cmd = in_namespace("mount --bind params.yaml params.yaml", [sys.executable, "-c", code])
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert path.read_text() == "a: 2\n"


def test_an_out_file_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    (tmp_path / "data.csv").write_text("x\n")
    with pytest.raises(TunelineError, match=r"--out '.*' is a folder. Fix: .*--out .*/evaluation.json"):
        check_out_file(tmp_path, "--out", "evaluation.json")
    with pytest.raises(TunelineError, match=r"goes through '.*data.csv', which is a file"):
        check_out_file(tmp_path / "data.csv" / "deeper" / "e.json", "--out", "evaluation.json")
    with pytest.raises(TunelineError, match=r"no file can be written in '/proc'"):
        check_out_file(Path("/proc/e.json"), "--out", "evaluation.json")
    # missing folders are made when it is written; an existing file is replaced
    check_out_file(tmp_path / "new" / "deeper" / "e.json", "--out", "evaluation.json")
    check_out_file(tmp_path / "data.csv", "--out", "evaluation.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]  # the check leaves nothing behind


def test_an_out_file_of_another_format_than_the_one_written_is_refused(tmp_path):
    """`tuneline evaluate -d test.csv --out test.csv` replaced the user's data with JSON."""
    with pytest.raises(
        TunelineError,
        match=r"--out '.*test.csv' does not end in .json, and what is written there is JSON. "
        r"Fix: give a .json path, e.g. --out .*test.json$",
    ):
        check_out_file(tmp_path / "test.csv", "--out", "evaluation.json", "JSON")
    with pytest.raises(TunelineError, match=r"does not end in .json"):
        check_out_file(tmp_path / "report", "--out", "evaluation.json", "JSON")
    check_out_file(tmp_path / "e.JSON", "--out", "evaluation.json", "JSON")


def test_a_path_is_shown_from_here_when_it_lies_below_else_whole(tmp_path, monkeypatch):
    (tmp_path / "project" / "reports").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    assert shown(tmp_path / "project" / "reports" / "x.json") == os.path.join("reports", "x.json")
    assert shown("reports/x.json") == os.path.join("reports", "x.json")
    assert shown(tmp_path / "elsewhere.json") == str((tmp_path / "elsewhere.json").resolve())  # not ../elsewhere.json
    assert shown(tmp_path / "project" / "..x.json") == "..x.json"  # a name that starts with dots is below
