"""The only module that reads or writes model files (and the atomic file writes).

A pruned model is one ``torch.save`` dict of plain data — the base model spec,
the input shape, torch-pruning's replayable pruning history and the state dict —
so it loads with ``torch.load(weights_only=True)``: no pickled modules, no code
runs on load. ``load_pruned`` rebuilds the base architecture, replays the
history (which reproduces every shrunken layer exactly) and loads the weights.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError, ModelError
from .graph import HISTORY_ATTR, INPUT_ATTR, replay_history
from .models import SPEC_ATTR, build_from_spec

FORMAT = "rlpruner-ray/model"
FORMAT_VERSION = 1


# ---------------------------------------------------------------- atomic writes
def atomic_write_bytes(path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: a kill mid-write
    leaves the previous version intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())   # mkstemp's 0600 would hide results from the user's group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask."""
    try:   # Linux reports the umask without changing it (no window where another thread sees 0)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temps(*folders) -> int:
    """Delete the temp files (``.NAME.*.tmp``) of atomic writes that a kill cut short;
    the files they were to replace are intact. Returns how many were removed."""
    removed = 0
    for folder in map(Path, folders):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def atomic_write_json(path, obj, *, sort_keys: bool = True) -> None:
    """``sort_keys=False`` keeps the dicts' own order (e.g. groups in layer order)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default)
    atomic_write_bytes(path, (text + "\n").encode())


def load_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(path, obj: dict) -> None:
    """Atomically ``torch.save`` a dict of plain data and tensors."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(source) -> dict:
    """``torch.load(weights_only=True)`` of a path or bytes, with every failure
    (missing, truncated, random bytes, a pickle that would run code) turned into
    one CheckpointError line."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and Path(source).is_dir():
        raise CheckpointError(f"{name} is a folder, not a checkpoint file")
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise CheckpointError(f"checkpoint not found: {name}")
    if isinstance(source, (bytes, bytearray)):
        head, stream = bytes(source[:4]), io.BytesIO(source)
    else:
        with open(source, "rb") as f:
            head = f.read(4)
        stream = source
    if head != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"{name} is not a torch checkpoint (truncated, corrupted or another format)")
    try:
        obj = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{name} holds objects other than tensors and plain data; "
                              "refused, since loading it could run code") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, AttributeError,
            TypeError, OSError, IndexError):
        raise CheckpointError(f"{name} is truncated, corrupted or not a torch checkpoint") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} does not hold a checkpoint dict")
    return obj


# ---------------------------------------------------------------- models
def tag_model(model: nn.Module, spec: dict, input_shape) -> nn.Module:
    """Attach what a checkpoint needs to rebuild ``model`` (survives deepcopy and prune)."""
    setattr(model, SPEC_ATTR, dict(spec))
    setattr(model, INPUT_ATTR, [int(v) for v in input_shape])
    return model


def _state_with_metadata(model: nn.Module) -> tuple[dict, dict]:
    """The weights, and the per-module metadata (layout versions) some modules check
    when loading (torchvision's MNASNet refuses a state dict without it)."""
    state = model.state_dict()
    metadata = {prefix: {k: v for k, v in entry.items() if isinstance(v, (int, float, str, bool))}
                for prefix, entry in getattr(state, "_metadata", {}).items()}
    return {k: v.detach().cpu() for k, v in state.items()}, metadata


def _load_state(model: nn.Module, weights: dict, metadata) -> None:
    state = OrderedDict(weights)
    if isinstance(metadata, dict):
        state._metadata = {str(k): dict(v) for k, v in metadata.items() if isinstance(v, dict)}
    model.load_state_dict(state, strict=True)


def model_record(model: nn.Module, meta: dict | None = None) -> dict:
    weights, metadata = _state_with_metadata(model)
    spec = getattr(model, SPEC_ATTR, None)
    input_shape = getattr(model, INPUT_ATTR, None)
    if spec is None:
        raise CheckpointError("model has no spec: build it with build_model (or tag_model) first")
    if input_shape is None:
        raise CheckpointError("model has no input shape: build a PruningGraph on it or call tag_model")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec,
        "input_shape": input_shape,
        "history": [list(h) for h in getattr(model, HISTORY_ATTR, [])],
        "state_dict": weights,
        "state_metadata": metadata,
        "meta": dict(meta or {}),
    }


def save_pruned(model: nn.Module, path, meta: dict | None = None) -> None:
    save_tensors(path, model_record(model, meta))


def model_to_bytes(model: nn.Module, meta: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save(model_record(model, meta), buf)
    return buf.getvalue()


def read_model_record(source) -> dict:
    record = load_tensors(source)
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    fmt, version = record.get("format"), record.get("format_version")
    if not (isinstance(fmt, str) and fmt == FORMAT):      # (type first: a tensor has no truth value)
        raise CheckpointError(f"{name} is not an rlpruner-ray model file")
    if not (type(version) is int and version == FORMAT_VERSION):
        raise CheckpointError(f"{name} has format version {version!r:.20}, this version reads {FORMAT_VERSION}")
    return record


def is_factory_name(name) -> bool:
    """``pkg.module:factory`` (imports user code), as opposed to a zoo or ``tv:`` name."""
    return isinstance(name, str) and ":" in name and not name.strip().lower().startswith("tv:")


def _check_import_allowed(spec, allow_import) -> None:
    """A model file names its architecture; a ``pkg.module:factory`` name would import
    (run) that module. Only do so when the caller named that factory itself."""
    name = spec.get("name") if isinstance(spec, dict) else None
    if not is_factory_name(name):
        return
    if allow_import is True or (isinstance(allow_import, str) and allow_import.strip() == name.strip()):
        return
    raise CheckpointError(f"checkpoint's model is the user factory {name!r}, which loading would import; "
                          f"refused unless named explicitly (--model {name.strip()} / allow_import=)")


# bounds on what a file may make us allocate before its weights are checked
_MAX_INPUT_ELEMENTS = 2 ** 26   # C*H*W of the example input rebuilt on load (1024x1024 RGB is 3M)
_MAX_SPEC_SIZES = (100_000, 1024)   # num_classes, in_channels


def _check_record_fields(record: dict) -> None:
    """Types and sizes of a record's plain data, before anything is built from it."""
    shape = record.get("input_shape")
    if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 3
            and all(type(v) is int and v > 0 for v in shape) and math.prod(shape) <= _MAX_INPUT_ELEMENTS):
        raise CheckpointError(f"checkpoint has a bad input shape {shape!r:.60}")
    if not isinstance(record.get("history"), (list, tuple)):
        raise CheckpointError("checkpoint's pruning history is not a list")
    if not isinstance(record.get("state_dict"), dict):
        raise CheckpointError("checkpoint's weights are not a state dict")
    spec = record.get("spec")
    sizes = [spec.get("num_classes"), spec.get("in_channels")] if isinstance(spec, dict) else []
    if any(type(v) is int and v > limit for v, limit in zip(sizes, _MAX_SPEC_SIZES)):
        raise CheckpointError(f"checkpoint's model spec is out of range: {spec!r:.80}")


def model_from_record(record: dict, *, allow_import: bool | str = False) -> nn.Module:
    """Rebuild a model from a record. ``allow_import``: True, or the exact
    ``pkg.module:factory`` name the caller chose, lets a user factory be imported."""
    if not isinstance(record, dict):
        raise CheckpointError(f"model record must be a dict, got {type(record).__name__}")
    _check_import_allowed(record.get("spec"), allow_import)
    _check_record_fields(record)
    try:
        model = build_from_spec(record["spec"])
        example = torch.zeros(1, *record["input_shape"])
        replay_history(model, example, record["history"])
        _load_state(model, record["state_dict"], record.get("state_metadata"))
    except (ModelError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not match its model: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError, AssertionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"checkpoint does not match its model: {first}") from None
    tag_model(model, record["spec"], record["input_shape"])
    return model.eval()


def load_pruned(source, *, allow_import: bool | str = False) -> nn.Module:
    """Load a model file (path or bytes) written by :func:`save_pruned`; the returned
    module has the pruned architecture and gives identical outputs. A file whose
    model is a user factory (``pkg.module:factory``) is refused unless
    ``allow_import`` is True or that factory's name: loading never imports a
    module the caller did not name."""
    return model_from_record(read_model_record(source), allow_import=allow_import)


def export_model(model: nn.Module, path, fmt: str) -> None:
    """Export for serving: ``torchscript`` (traced) or ``onnx``."""
    example = torch.zeros(1, *getattr(model, INPUT_ATTR))
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated but still the portable format
            traced = torch.jit.trace(model, example)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        atomic_write_bytes(path, buf.getvalue())
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise CheckpointError("ONNX export needs the 'onnx' package: pip install onnx onnxscript") from None
        tmp = path.with_name(f".{path.name}.tmp")
        torch.onnx.export(model, (example,), str(tmp), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        os.replace(tmp, path)
    else:
        raise CheckpointError(f"unknown export format {fmt!r}; choose torchscript or onnx")
