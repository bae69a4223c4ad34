"""Bad model files: truncated, random bytes, corrupted, another model's weights,
malformed plain data, a pickle crafted to run code, and a file naming a user
factory module. ``load_pruned`` refuses each with one CheckpointError line and
runs no code from the file (the crafted pickle's marker file never appears)."""
from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlpruner_ray import checkpoint as ckpt
from rlpruner_ray.errors import CheckpointError
from rlpruner_ray.models import build_model, model_spec

from .helpers import Evil
from .helpers import factory_checkpoint, write_factory_package

MARKER = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rlpruner-pwned-{os.getpid()}")


def _evil():
    return Evil(MARKER)


@pytest.fixture(autouse=True)
def no_marker():
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    yield
    assert not os.path.exists(MARKER), "a model file ran code on load"


def _model(name="resnet8", seed=0):
    torch.manual_seed(seed)
    model = build_model(name, 10, 1)
    return ckpt.tag_model(model, model_spec(name, 10, 1), (1, 16, 16))


@pytest.fixture(scope="module")
def good_bytes():
    return ckpt.model_to_bytes(_model())


def _refused(source, **kw) -> str:
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_pruned(source, **kw)
    msg = str(exc.value)
    assert msg.strip() and len(msg.splitlines()) == 1, msg
    return msg


# ---------------------------------------------------------------------- damaged files
def test_good_file_loads(good_bytes, tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(good_bytes)
    model = ckpt.load_pruned(path)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model(x), _model().eval()(x))


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_file_is_refused(good_bytes, fraction):
    _refused(good_bytes[: int(len(good_bytes) * fraction)])


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096), zip_header=st.booleans())
def test_random_bytes_are_refused(data, zip_header):
    _refused((b"PK\x03\x04" if zip_header else b"") + data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8))
def test_corrupted_bytes_are_refused_or_load_a_whole_model(good_bytes, flips):
    raw = bytearray(good_bytes)
    for where, xor in flips:
        raw[int(where * len(raw))] ^= xor
    try:
        model = ckpt.load_pruned(bytes(raw))
    except CheckpointError as exc:
        assert len(str(exc).splitlines()) == 1
    else:   # flipped bits in weight data are undetectable, but the model is whole
        model(torch.zeros(1, 1, 16, 16))


def test_zip_with_a_corrupted_pickle_is_refused(good_bytes):
    src = zipfile.ZipFile(io.BytesIO(good_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            dst.writestr(info, data)
    _refused(out.getvalue())


def test_checkpoint_of_another_model_is_refused(tmp_path):
    record = ckpt.model_record(_model())
    record["state_dict"] = {k: v for k, v in _model("resnet20").state_dict().items()}
    path = tmp_path / "other.pt"
    ckpt.save_tensors(path, record)
    assert "does not match" in _refused(path)
    # a spec for 100 classes with 10-class weights
    record = ckpt.model_record(_model())
    record["spec"] = dict(record["spec"], num_classes=100)
    ckpt.save_tensors(path, record)
    assert "does not match" in _refused(path)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.one_of(st.integers(-3, 40), st.text(max_size=3), st.none()), max_size=4),
                   st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=3),
                   st.builds(torch.zeros, st.integers(0, 3)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["spec", "input_shape", "history", "state_dict", "meta", "format", "format_version",
                              "spec.name", "spec.num_classes", "spec.in_channels", "state_dict.entry"]),
       value=VALUES)
def test_malformed_plain_data_is_refused_in_one_line(field, value):
    record = ckpt.model_record(_model())
    if field == "spec.name" and isinstance(value, str) and ":" in value:
        value = value.replace(":", "_")     # factory names: test_factory_checkpoint_is_not_imported
    if "." in field:
        outer, inner = field.split(".")
        if inner == "entry":
            key = sorted(record[outer])[0]
            record[outer][key] = value
        else:
            record[outer][inner] = value
    else:
        record[field] = value
    buf = io.BytesIO()
    torch.save(record, buf)
    try:
        ckpt.load_pruned(buf.getvalue())
    except CheckpointError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
    else:   # harmless changes only: the model is unpruned, so its history and input shape are unused
        harmless = {"meta", "input_shape"} | ({field} if _unchanged(field, value) else set())
        assert field in harmless or (field == "spec.name" and value.strip().lower() == "resnet8"), (field, value)


def _unchanged(field, value) -> bool:
    original = ckpt.model_record(_model())
    outer, _, inner = field.partition(".")
    old = original[outer] if not inner else (original[outer].get(inner) if inner != "entry" else None)
    try:
        return bool(old == value)
    except (RuntimeError, TypeError):
        return False


# ---------------------------------------------------------------------- files crafted to run code
def _evil_files() -> dict[str, bytes]:
    files = {}
    buf = io.BytesIO()
    torch.save(_evil(), buf)                                  # torch's zip format, pickle runs os.system
    files["torch.save(obj)"] = buf.getvalue()
    record = ckpt.model_record(_model())
    record["meta"] = {"note": _evil()}                        # hidden deep inside a genuine record
    buf = io.BytesIO()
    torch.save(record, buf)
    files["nested in a record"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(_evil(), buf, _use_new_zipfile_serialization=False)   # torch's legacy format
    files["legacy torch format"] = buf.getvalue()
    files["raw pickle"] = pickle.dumps(_evil(), protocol=2)
    return files


def test_crafted_pickles_are_live():
    """The payloads really run code when unpickled the unsafe way (the test's premise)."""
    pickle.loads(_evil_files()["raw pickle"])
    assert os.path.exists(MARKER)
    os.unlink(MARKER)


@pytest.mark.parametrize("name", ["torch.save(obj)", "nested in a record", "legacy torch format", "raw pickle"])
def test_crafted_pickle_is_refused_and_runs_nothing(name, tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(_evil_files()[name])
    _refused(path)
    _refused(path.read_bytes())
    with pytest.raises(CheckpointError):
        ckpt.load_tensors(path)
    assert not os.path.exists(MARKER)


# ---------------------------------------------------------------------- user factories
@pytest.fixture
def evil_factory(tmp_path, monkeypatch):
    """A module on sys.path that writes a marker when imported, and a genuine model
    file whose spec names its factory."""
    marker = tmp_path / "imported"
    name = write_factory_package(tmp_path / "site", marker)
    path = factory_checkpoint(tmp_path / "factory_model.pt", name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for mod in ("rlpr_evilpkg", "rlpr_evilpkg.mod"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    yield {"name": name, "path": path, "marker": marker, "site": tmp_path / "site"}
    for mod in ("rlpr_evilpkg", "rlpr_evilpkg.mod"):
        sys.modules.pop(mod, None)


def test_factory_checkpoint_is_not_imported_unless_named(evil_factory):
    path, marker, name = evil_factory["path"], evil_factory["marker"], evil_factory["name"]
    msg = _refused(path)
    assert name in msg and "--model" in msg
    _refused(path, allow_import="rlpr_otherpkg.mod:factory")
    _refused(path, allow_import="resnet8")
    assert not marker.exists() and "rlpr_evilpkg.mod" not in sys.modules
    model = ckpt.load_pruned(path, allow_import=name)          # named explicitly: imported
    assert marker.exists() and "rlpr_evilpkg.mod" in sys.modules
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _model().parameters())


def test_zoo_models_and_files_import_no_user_module(tmp_path, evil_factory):
    """Building zoo models and loading zoo files import nothing from outside the
    standard library, the installed packages and the project (the factory module
    on sys.path stays untouched)."""
    import sysconfig
    from pathlib import Path

    path = tmp_path / "zoo.pt"
    ckpt.save_pruned(_model("resnet20"), path)
    before = set(sys.modules)
    for name in ("resnet8", "vgg11", "mobilenetv3_small", "tv:resnet18"):
        build_model(name, 10, 1)
    ckpt.load_pruned(path)
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(Path(ckpt.__file__).resolve().parents[1])
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None)
        if file:
            assert any(Path(file).resolve().is_relative_to(r) for r in roots), (name, file)
    assert not evil_factory["marker"].exists() and "rlpr_evilpkg" not in sys.modules
