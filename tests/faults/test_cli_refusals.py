"""The real command, in fresh processes: bad arguments, bad datasets and bad
model files each give exit code 2 and one line on stderr, no traceback, and
write nothing (neither the output folder nor anything in the working folder).
The processes run a few at a time; the in-process tests (test_bad_input.py,
test_checkpoints.py) cover the breadth."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from rlpruner_ray import checkpoint as ckpt
from rlpruner_ray.models import build_model, model_spec

from .helpers import Evil, assert_refused, cli, factory_checkpoint, write_factory_package


def _npz(folder: Path, *, train=None, test=None) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)

    def images(n, shape=(8, 8, 1)):
        return rng.integers(0, 256, (n, *shape), dtype=np.uint8)

    train = train or {"images": images(40), "labels": np.arange(40) % 4}
    test = test or {"images": images(12), "labels": np.arange(12) % 4}
    np.savez(folder / "train.npz", **train)
    np.savez(folder / "test.npz", **test)
    return f"npz:{folder}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    good = ckpt.model_to_bytes(ckpt.tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1),
                                              (1, 16, 16)))
    (d / "truncated.pt").write_bytes(good[: len(good) // 3])
    marker = d / "pickle-ran"
    torch.save(Evil(marker), d / "evil.pt")
    other = ckpt.model_record(ckpt.tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1),
                                             (1, 16, 16)))
    other["state_dict"] = build_model("resnet20", 10, 1).state_dict()
    ckpt.save_tensors(d / "other_model.pt", other)
    imported = d / "factory-imported"
    name = write_factory_package(d / "site", imported)
    factory_checkpoint(d / "factory.pt", name)
    img = lambda n, shape: rng.integers(0, 256, (n, *shape), dtype=np.uint8)   # noqa: E731
    data = {
        "channels_first": _npz(d / "cf", train={"images": img(40, (3, 8, 8)), "labels": np.arange(40) % 4}),
        "label_out_of_range": _npz(d / "oor", train={"images": img(40, (8, 8, 1)), "labels": np.arange(40) % 4,
                                                     "classes": np.array(["a", "b"])}),
        "empty_test": _npz(d / "empty", test={"images": img(0, (8, 8, 1)), "labels": np.zeros(0, np.int64)}),
    }
    return {"dir": d, "marker": marker, "imported": imported, "factory": name, "site": d / "site", "data": data}


def _cases(files, tmp: Path):
    d, data = files["dir"], files["data"]
    out = tmp / "out"
    compress = lambda *a: ["compress", "--out-dir", str(out), *a]   # noqa: E731
    no_gpu = [] if torch.cuda.is_available() else [("cuda without a GPU", compress("--device", "cuda"), "CUDA")]
    return [
        ("NaN sparsity", compress("--sparsity", "nan"), "sparsity"),
        ("float where an int goes", compress("--evaluations-per-step", "2.5"), "evaluations-per-step"),
        ("empty model name", compress("--model", ""), "model"),
        ("bad device string", compress("--device", "cudax"), "device"),
        ("unknown option", compress("--sparsity", "0.5", "--bogus"), "unrecognized"),
        *no_gpu,
        ("missing image folder", compress("--dataset", f"imagefolder:{d / 'nope'}"), "does not exist"),
        ("channels-first arrays", compress("--dataset", data["channels_first"]), "channels"),
        ("label out of range", compress("--dataset", data["label_out_of_range"]), "out of range"),
        ("empty test split", compress("--dataset", data["empty_test"]), "empty"),
        ("truncated model file", ["evaluate", str(d / "truncated.pt")], "truncated"),
        ("crafted pickle", ["evaluate", str(d / "evil.pt")], "could run code"),
        ("another model's weights", ["evaluate", str(d / "other_model.pt")], "does not match"),
        ("unnamed user factory", ["evaluate", str(d / "factory.pt")], files["factory"]),
        ("factory as base checkpoint", compress("--base-checkpoint", str(d / "factory.pt")), files["factory"]),
    ]


@pytest.mark.slow
def test_bad_input_on_the_command_line(files, tmp_path):
    cases = _cases(files, tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(files["site"]), os.environ.get("PYTHONPATH", "")])}
    work = []
    for i, (what, args, expect) in enumerate(cases):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        work.append((what, args, expect, cwd))
    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(lambda w: cli(w[1], env=env, cwd=w[3]), work))
    failures = []
    for (what, args, expect, cwd), result in zip(work, results):
        try:
            assert_refused(result, contains=expect)
            assert list(cwd.iterdir()) == [], f"{what}: wrote {list(cwd.iterdir())}"
        except AssertionError as exc:
            failures.append(f"{what}: {exc}")
    assert failures == []
    assert not (tmp_path / "out").exists()
    assert not files["marker"].exists(), "the crafted pickle ran"
    assert not files["imported"].exists(), "the factory module was imported without being named"


@pytest.mark.slow
def test_factory_file_loads_when_its_factory_is_named(files, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(files["site"]), os.environ.get("PYTHONPATH", "")])}
    r = cli(["evaluate", str(files["dir"] / "factory.pt"), "--model", files["factory"], "--split", "val"],
            env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files["imported"].exists()
    files["imported"].unlink()
