"""Refusals a new user meets: one line on stderr and nothing before it, exit code 2,
the flag named as typed, nothing written. Run in-process (``cli.main``), with the
file descriptors captured, so a line any library or the data loader printed first
would show."""
from __future__ import annotations

import numpy as np
import pytest

from rlpruner_ray.cli import as_flags, main


def _refused(capfd, argv, out) -> str:
    capfd.readouterr()
    assert main(argv) == 2
    captured = capfd.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1, captured
    assert lines[0].startswith("rlpruner: error: ")
    assert not out.exists() or not any(out.iterdir() if out.is_dir() else [])
    return lines[0]


def test_base_checkpoint_that_is_a_folder_is_named_a_folder(tmp_path, capfd):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", "--base-checkpoint", str(folder), "--out-dir", str(out)], out)
    assert line == f"rlpruner: error: {folder} is a folder, not a checkpoint file"


def test_missing_checkpoint(tmp_path, capfd):
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", "--base-checkpoint", str(tmp_path / "nope.pt"), "--out-dir", str(out)], out)
    assert line == f"rlpruner: error: checkpoint not found: {tmp_path / 'nope.pt'}"


def test_prune_refuses_a_folder_checkpoint_before_loading_data(tmp_path, capfd):
    out = tmp_path / "out"
    line = _refused(capfd, ["prune", "--base-checkpoint", str(tmp_path), "--out-dir", str(out)], out)
    assert line.endswith("is a folder, not a checkpoint file")


def test_resource_request_the_machine_cannot_meet(tmp_path, capfd):
    import os
    out = tmp_path / "out"
    runners = (os.cpu_count() or 1) + 3
    line = _refused(capfd, ["compress", "--algo", "sac", "--rl-num-env-runners", str(runners),
                            "--out-dir", str(out)], out)
    assert "CPU" in line


@pytest.mark.parametrize("argv, flag", [
    (["--evaluations-per-step", "0"], "--evaluations-per-step must be >= 1"),
    (["--gpus-per-worker", "1.5"], "--gpus-per-worker must be a fraction"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_messages_name_the_flag_as_typed(tmp_path, capfd, argv, flag):
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", *argv, "--out-dir", str(out)], out)
    assert line.startswith(f"rlpruner: error: {flag}"), line


def test_out_dir_that_is_a_file(tmp_path, capfd):
    out = tmp_path / "file"
    out.write_text("x")
    capfd.readouterr()
    assert main(["compress", "--out-dir", str(out)]) == 2
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == f"rlpruner: error: --out-dir {out} exists and is not a folder\n"
    assert out.read_text() == "x"


def test_text_file_named_npz_is_not_an_npz_archive(tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.npz").write_text("images,labels\n1,2\n")
    np.savez(data / "test.npz", images=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(2, np.int64))
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", "--dataset", f"npz:{data}", "--out-dir", str(out)], out)
    assert line == f"rlpruner: error: {data / 'train.npz'} is not an .npz archive (a zip of .npy arrays " \
                   "'images' and 'labels')"
    assert "pickle" not in line


def test_npz_with_pickled_objects_stays_refused(tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        np.savez(data / f"{split}.npz", images=np.array([object()] * 2, dtype=object), labels=np.zeros(2))
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", "--dataset", f"npz:{data}", "--out-dir", str(out)], out)
    assert "cannot read arrays" in line


def test_a_folder_named_train_npz_is_named_a_folder(tmp_path, capfd):
    data = tmp_path / "data"
    (data / "train.npz").mkdir(parents=True)
    out = tmp_path / "out"
    line = _refused(capfd, ["compress", "--dataset", f"npz:{data}", "--out-dir", str(out)], out)
    assert f"{data / 'train.npz'} is a folder" in line


def test_field_names_become_flags_but_paths_and_words_stay():
    assert as_flags("out_dir /tmp/out_dir/x exists") == "--out-dir /tmp/out_dir/x exists"
    assert as_flags("unknown model 'x'; seed 3") == "unknown model 'x'; seed 3"
    assert as_flags("sparsity must be <= 1") == "--sparsity must be <= 1"


def test_no_colour_codes_from_ray_when_the_output_is_not_a_terminal(monkeypatch, capfd):
    """Ray's worker lines carry colour codes and a reset (\\x1b[0m) unless told not to;
    under capture, stderr is no terminal, so the command tells it."""
    import os
    monkeypatch.setenv("RAY_COLOR_PREFIX", "unset")    # (so the undo removes what the command sets)
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    assert main(["compress", "--evaluations-per-step", "0"]) == 2
    assert os.environ.get("RAY_COLOR_PREFIX") == "0"
    assert "\x1b" not in "".join(capfd.readouterr())
