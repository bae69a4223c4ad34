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
import os
import pickle
import tempfile
import warnings
import zipfile
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
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


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


def model_record(model: nn.Module, meta: dict | None = None) -> dict:
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
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
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
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not an rlpruner-ray model file")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{name} has format version {record.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    return record


def model_from_record(record: dict) -> nn.Module:
    try:
        model = build_from_spec(record["spec"])
        example = torch.zeros(1, *record["input_shape"])
        replay_history(model, example, record["history"])
        model.load_state_dict(record["state_dict"], strict=True)
    except (ModelError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not match its model: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"checkpoint does not match its model: {str(exc).splitlines()[0][:200]}") from None
    tag_model(model, record["spec"], record["input_shape"])
    return model.eval()


def load_pruned(source) -> nn.Module:
    """Load a model file (path or bytes) written by :func:`save_pruned`; the returned
    module has the pruned architecture and gives identical outputs."""
    return model_from_record(read_model_record(source))


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
