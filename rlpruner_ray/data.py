"""Datasets held in memory as uint8 tensors, with fast batched augmentation.

This is the only module that knows where data comes from. Every source is
turned into the same shape (uint8 NCHW images, int64 labels, already at the
dataset's image size) so training never touches PIL or DataLoader workers:
on two CPU cores the per-sample Python overhead of a DataLoader would cost
more than the small networks we train.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

log = logging.getLogger("rlpruner_ray")

SPLITS = ("train", "val", "test")
# Parts of the test split, present when a selection fraction is asked for.
TEST_PARTS = ("selection", "final")
# The held-out test split must not move when the user changes --seed, otherwise
# accuracies from different runs would be measured on different images; nor may
# its selection/final halves.
_TEST_SEED = 20240611
_SELECTION_SEED = 20261207
_TEST_FRACTION = 0.2
_DIGITS_SIZE = 16
_IMAGEFOLDER_SIZE = 32
_CHUNK = 4096  # images per chunk when converting, so float copies stay small


@dataclass
class Split:
    images: torch.Tensor  # uint8, [N, C, H, W]
    labels: torch.Tensor  # int64, [N]

    def __post_init__(self) -> None:
        # Cheap structural checks: every later step assumes exactly this layout.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"split images must be uint8 [N, C, H, W], "
                            f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"split labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    # The test split's selection and final parts (``with_selection``), else None.
    selection: Split | None = None
    final: Split | None = None
    # Copies of the splits on an accelerator, made once so each batch is a
    # device-side gather instead of a host-to-device copy.
    _device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # Never ship accelerator copies when the dataset is pickled (e.g. to Ray workers).
        state = dict(self.__dict__)
        state["_device_cache"] = {}
        return state

    def split(self, name: str) -> Split:
        if name in TEST_PARTS:
            if self.selection is None:
                raise DataError(f"split {name!r} exists only when the test split is divided "
                                "(selection_fraction > 0)")
            return getattr(self, name)
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS + TEST_PARTS)}")
        return getattr(self, name)

    @property
    def final_split(self) -> str:
        """The split a run's final test accuracy is measured on: the final part when the
        test split is divided, else the whole of it."""
        return "test" if self.selection is None else "final"

    def with_selection(self, fraction: float) -> "Dataset":
        """This dataset with its test split divided into a ``selection`` part (``fraction``
        of every class) and a ``final`` part (the rest). The halves depend only on the
        test labels and a fixed seed, never on a run's seed, so every run and seed
        sees the same ones. ``fraction`` 0 returns the dataset undivided."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ConfigError(f"selection_fraction must be in [0, 1), got {fraction!r}")
        if fraction == 0:
            return self
        final, selection = _stratified_split(self.test.labels.numpy(), fraction, _SELECTION_SEED)
        if len(final) == 0 or len(selection) == 0:
            raise DataError(f"selection_fraction={fraction} of {len(self.test)} test images leaves an empty "
                            f"{'selection' if len(selection) == 0 else 'final'} part")
        divided = copy.copy(self)
        divided._device_cache = {}
        divided.selection = Split(self.test.images[selection], self.test.labels[selection])
        divided.final = Split(self.test.images[final], self.test.labels[final])
        return divided

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)

    def _tensors_on(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part = self.split(split)
        if device.type == "cpu":
            return part.images, part.labels
        key = (split, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = (part.images.to(device), part.labels.to(device))
        return self._device_cache[key]

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, device="cpu", limit: int | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised float NCHW images, int64 labels); `limit` caps the number of batches."""
        # Checked here, not inside the generator, so bad arguments fail at the call site.
        part = self.split(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"limit must be None or an integer >= 0, got {limit!r}")
        device = torch.device(device)
        n = len(part)
        n_batches = math.ceil(n / batch_size)
        if limit is not None:
            n_batches = min(n_batches, limit)
        # Augmentation is a training-time device only; evaluation must see the real images.
        return self._iterate(split, batch_size, n_batches, shuffle, augment and split == "train", generator, device)

    def _iterate(self, split, batch_size, n_batches, shuffle, augment, generator, device):
        images, labels = self._tensors_on(split, device)
        n = len(labels)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(device)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = images[idx]
            if augment:
                x = self._augment(x, generator)
            x = x.float().div_(255.0).sub_(mean).div_(std)
            yield x, labels[idx]

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random crop with zero padding plus optional horizontal flip, for a whole batch at once."""
        b, c, s, _ = x.shape
        pad = self.image_size // 8  # 4 pixels at 32x32, scaled for other sizes
        # Random numbers come from the CPU generator so runs are reproducible on any device.
        offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).to(x.device)
        flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        padded = x.new_zeros(b, c, s + 2 * pad, s + 2 * pad)
        padded[:, :, pad:pad + s, pad:pad + s] = x
        ar = torch.arange(s, device=x.device)
        rows = offsets[:, :1] + ar
        cols = offsets[:, 1:] + ar
        if self.flip:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        # One gather on the flattened planes crops (and flips) every image of the batch;
        # it measured faster than multi-axis advanced indexing.
        flat_idx = (rows[:, :, None] * (s + 2 * pad) + cols[:, None, :]).view(b, 1, s * s).expand(b, c, s * s)
        return padded.view(b, c, -1).gather(2, flat_idx).view(b, c, s, s)


def dataset_names() -> list[str]:
    return ["digits", "cifar10", "cifar100", "npz:<folder>", "imagefolder:<folder>"]


def load_dataset(name: str, data_dir: str | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = False, image_size: int | None = None) -> Dataset:
    _check_options(val_fraction, seed, image_size)
    kind, sep, path = str(name).partition(":")
    kind = kind.strip().lower()
    if sep and kind in ("npz", "imagefolder"):
        if not path.strip():
            raise DataError(f"dataset {name!r} needs a folder after '{kind}:', e.g. {kind}:/data/mycifar")
        if kind == "npz":
            raw = _load_npz(path)
        else:
            raw = _load_imagefolder(path, image_size or _IMAGEFOLDER_SIZE)
    elif not sep and kind == "digits":
        raw = _load_digits()
        image_size = image_size or _DIGITS_SIZE
    elif not sep and kind in ("cifar10", "cifar100"):
        raw = _load_cifar(kind, data_dir, download)
    else:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return _assemble(str(name), raw, image_size, val_fraction, seed)


def _check_options(val_fraction, seed, image_size) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be None or an integer >= 1, got {image_size!r}")


@dataclass
class _Raw:
    """What every source produces before splitting: train and test parts plus metadata."""
    train_images: torch.Tensor  # uint8 NCHW, any square-or-not size
    train_labels: torch.Tensor  # int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    flip: bool
    where: str  # names the source in error messages


# ---------------------------------------------------------------- sources

def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; stretch to the full uint8 range like any photo.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    rest, test = _stratified_split(labels, _TEST_FRACTION, _TEST_SEED)
    t_images, t_labels = torch.from_numpy(images), torch.from_numpy(labels)
    # Mirrored digits are different symbols (or none), so no flipping.
    return _Raw(t_images[rest], t_labels[rest], t_images[test], t_labels[test], 10, False, "digits")


def _load_cifar(kind: str, data_dir: str | None, download: bool) -> _Raw:
    from torchvision import datasets

    root = data_dir or "./data"
    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    parts = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=download)
        except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"{kind} not found under {root!r}; pass --download or use npz:<folder> ({exc})") from None
        except OSError as exc:
            raise DataError(f"could not download or read {kind} under {root!r}: {exc}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        parts += [images, torch.as_tensor(ds.targets, dtype=torch.int64)]
    num_classes = 10 if kind == "cifar10" else 100
    return _Raw(*parts, num_classes, True, f"{kind} under {root!r}")


def _read_npz(path: str) -> dict:
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; an npz dataset folder needs the files train.npz and test.npz")
    if not os.path.isfile(path):
        raise DataError(f"missing file {path}; an npz dataset folder needs train.npz and test.npz")
    with open(path, "rb") as f:
        head = f.read(6)
    # an .npz is a zip of .npy arrays; anything else would reach numpy's pickle path and
    # a message about unsafe loading, though the file is no pickle (pickles stay refused)
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise DataError(f"{path} is not an .npz archive (a zip of .npy arrays 'images' and 'labels')")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, expected an .npz archive with 'images' and 'labels'")
    with archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            found = ", ".join(archive.files) or "none"
            raise DataError(f"{path} lacks array(s) {', '.join(sorted(missing))}; found {found}")
        keys = [k for k in ("images", "labels", "classes") if k in archive.files]
        try:
            return {k: archive[k] for k in keys}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:  # object arrays refuse to load without pickle
            raise DataError(f"cannot read arrays in {path}: {exc}") from None


def _npz_split(arrays: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8:
        raise DataError(f"images in {path} must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]  # grey NHW -> NHW1
    if images.ndim != 4:
        raise DataError(f"images in {path} must be NHWC or NHW, got shape {images.shape}")
    if images.shape[-1] not in (1, 3, 4):
        raise DataError(f"images in {path} have {images.shape[-1]} channels in the last axis; "
                        "expected NHWC with 1, 3 or 4 channels (is it channels-first?)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"labels in {path} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return tensor, torch.from_numpy(labels.astype(np.int64))


def _load_npz(folder: str) -> _Raw:
    if not os.path.isdir(folder):
        raise DataError(f"npz dataset folder {folder!r} does not exist")
    train = _read_npz(os.path.join(folder, "train.npz"))
    test = _read_npz(os.path.join(folder, "test.npz"))
    tr_x, tr_y = _npz_split(train, os.path.join(folder, "train.npz"))
    te_x, te_y = _npz_split(test, os.path.join(folder, "test.npz"))
    if "classes" in train:
        num_classes = len(train["classes"])
    else:
        tops = [int(y.max()) for y in (tr_y, te_y) if len(y)]
        num_classes = max(tops) + 1 if tops else 0
    return _Raw(tr_x, tr_y, te_x, te_y, num_classes, True, f"npz:{folder}")


def _load_imagefolder(root: str, size: int) -> _Raw:
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        (tr_x, tr_y, classes, tr_grey), (te_x, te_y, te_classes, te_grey) = (
            _decode_folder(train_dir, size), _decode_folder(test_dir, size))
        if te_classes != classes:
            raise DataError(f"class folders differ between {train_dir} and {test_dir}")
        if tr_grey and te_grey:
            tr_x, te_x = tr_x[:, :1], te_x[:, :1]
    else:
        x, y, classes, grey = _decode_folder(root, size)
        if grey:
            x = x[:, :1]
        rest, test = _stratified_split(y.numpy(), _TEST_FRACTION, _TEST_SEED)
        tr_x, tr_y, te_x, te_y = x[rest], y[rest], x[test], y[test]
    return _Raw(tr_x, tr_y, te_x, te_y, len(classes), True, f"imagefolder:{root}")


def _decode_folder(root: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str], bool]:
    """Decode every image of an ImageFolder tree to RGB at size x size; also report if all were grey."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(root)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"cannot use {root!r} as an image folder: {exc}") from None
    out = np.empty((len(folder.samples), size, size, 3), dtype=np.uint8)
    grey = True
    for i, (path, _) in enumerate(folder.samples):
        try:
            with Image.open(path) as im:
                grey = grey and im.mode in ("1", "L", "LA", "I", "I;16", "F")
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except OSError as exc:  # includes PIL.UnidentifiedImageError
            raise DataError(f"cannot decode image {path}: {exc}") from None
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor([t for _, t in folder.samples], dtype=torch.int64)
    return images, labels, list(folder.classes), grey


# ---------------------------------------------------------------- assembly

def _assemble(name: str, raw: _Raw, image_size: int | None, val_fraction: float, seed: int) -> Dataset:
    _check_part(raw, "train", raw.train_images, raw.train_labels)
    _check_part(raw, "test", raw.test_images, raw.test_labels)
    if raw.train_images.shape[1] != raw.test_images.shape[1]:
        raise DataError(f"{raw.where}: train has {raw.train_images.shape[1]} channels "
                        f"but test has {raw.test_images.shape[1]}")
    h, w = raw.train_images.shape[-2:]
    if image_size is None:
        if h != w:
            raise DataError(f"{raw.where}: images are {h}x{w}, not square; pass image_size to resize them")
        image_size = int(h)
    train_images = _resize(raw.train_images, image_size)
    test_images = _resize(raw.test_images, image_size)

    labels = raw.train_labels.numpy()
    keep, held = _stratified_split(labels, val_fraction, seed)
    if len(held) == 0 or len(keep) == 0:
        empty = "validation" if len(held) == 0 else "training"
        raise DataError(f"val_fraction={val_fraction} of {len(labels)} training images leaves an empty {empty} split")
    train = Split(train_images[keep], raw.train_labels[keep])
    val = Split(train_images[held], raw.train_labels[held])
    test = Split(test_images, raw.test_labels)
    mean, std = _channel_stats(train.images)
    data = Dataset(name, train, val, test, raw.num_classes, int(train_images.shape[1]), image_size, mean, std, raw.flip)
    log.info("loaded %s: %d train / %d val / %d test, %dx%dx%d, %d classes", name, len(train), len(val),
             len(test), data.in_channels, image_size, image_size, data.num_classes)
    return data


def _check_part(raw: _Raw, part: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    if len(images) != len(labels):
        raise DataError(f"{raw.where}: {part} has {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{raw.where}: the {part} split is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"{raw.where}: {part} labels must be >= 0, found {low}")
    if high >= raw.num_classes:
        raise DataError(f"{raw.where}: {part} label {high} is out of range for {raw.num_classes} classes")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 NCHW images, computed in float and rounded back."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < min(images.shape[-2:])
    chunks = []
    for start in range(0, len(images), _CHUNK):
        x = images[start:start + _CHUNK].float()
        # Antialiasing only matters when shrinking; it avoids aliasing artefacts.
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        chunks.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held) with `fraction` of every class held out (sorted indices)."""
    n = len(labels)
    n_held = int(math.floor(n * fraction + 0.5))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n_held / max(n, 1))
    take = np.floor(quota).astype(np.int64)
    # Largest remainders get the leftover slots so the total is exactly n_held.
    short = n_held - int(take.sum())
    if short > 0:
        take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    mask = np.zeros(n, dtype=bool)
    if held:
        mask[np.concatenate(held)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, exact, from a histogram of the 256 byte values."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for ch in range(images.shape[1]):
        # A histogram avoids a float copy of the whole training set.
        counts = np.bincount(images[:, ch].numpy().ravel(), minlength=256).astype(np.float64)
        mean = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - mean) ** 2).sum() / counts.sum())
        # A constant channel would divide by zero; leave it unscaled instead.
        means.append(mean)
        stds.append(math.sqrt(var) if var > 1e-16 else 1.0)
    return tuple(means), tuple(stds)
