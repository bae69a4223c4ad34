"""Tests for rlpruner_ray.data: loading, splitting, batching, augmentation and input errors."""

import os
import pickle

import numpy as np
import pytest
import torch

from rlpruner_ray.data import dataset_names, load_dataset
from rlpruner_ray.errors import ConfigError, DataError

SHARED_CIFAR = "/work/shared/data/cifar10"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def write_npz(folder, train, test, **train_extra):
    """Write train.npz/test.npz; `train` and `test` are (images, labels) pairs."""
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "train.npz"), images=train[0], labels=train[1], **train_extra)
    np.savez(os.path.join(folder, "test.npz"), images=test[0], labels=test[1])
    return str(folder)


def id_images(n, size=16, channels=3, offset=0):
    """RGB NHWC images whose first two pixels encode a unique id, so splits can be traced."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    images[:, 0, 0, 0] = ids % 256
    images[:, 0, 1, 0] = ids // 256
    return images


def ids_of(split):
    return set((split.images[:, 0, 0, 0].long() + 256 * split.images[:, 0, 0, 1].long()).tolist())


@pytest.fixture
def npz_folder(tmp_path):
    labels = np.arange(200) % 4
    return write_npz(tmp_path / "ds", (id_images(200), labels), (id_images(40, offset=1000), np.arange(40) % 4))


# ------------------------------------------------------------------ digits

def test_digits_shapes_and_types(digits):
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == 16
    for name in ("train", "val", "test"):
        part = digits.split(name)
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert tuple(part.images.shape[1:]) == (1, 16, 16)
        assert len(part) == len(part.labels) == len(part.images)
        assert int(part.labels.min()) >= 0 and int(part.labels.max()) <= 9
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == 359 and len(digits.val) == 144
    # Real images use the full byte range after scaling 0..16 to 0..255.
    assert int(digits.train.images.max()) == 255 and int(digits.train.images.min()) == 0
    assert digits.flip is False
    assert digits.example_inputs(3).shape == (3, 1, 16, 16)


def test_digits_native_size_when_asked():
    data = load_dataset("digits", image_size=8)
    assert data.train.images.shape[-2:] == (8, 8) and data.image_size == 8


def test_test_split_is_fixed_across_seeds(digits):
    other = load_dataset("digits", seed=7)
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.test.labels, digits.test.labels)
    # The validation split does follow the seed.
    assert not torch.equal(other.val.images, digits.val.images)


def test_val_split_is_stratified(digits):
    train_counts = torch.bincount(digits.train.labels, minlength=10) + torch.bincount(digits.val.labels, minlength=10)
    val_counts = torch.bincount(digits.val.labels, minlength=10)
    expected = train_counts.double() * 0.1
    assert torch.all((val_counts.double() - expected).abs() <= 1.0), (val_counts, expected)


def test_splits_are_disjoint_and_complete(npz_folder):
    data = load_dataset(f"npz:{npz_folder}", val_fraction=0.25, seed=3)
    train, val, test = ids_of(data.train), ids_of(data.val), ids_of(data.test)
    assert len(train) == len(data.train) and len(val) == len(data.val)
    assert train.isdisjoint(val)
    assert train | val == set(range(200))
    assert test == set(range(1000, 1040))
    assert len(data.val) == 50


# ------------------------------------------------------------------ batches

def test_batches_are_normalised(digits):
    xs = [x for x, _ in digits.batches("train", 256)]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (len(digits.train), 1, 16, 16)
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-2


def test_batches_limit_shuffle_and_sizes(digits):
    sizes = [len(y) for _, y in digits.batches("val", 50)]
    assert sizes == [50, 50, 44]
    assert len(list(digits.batches("train", 10, limit=3))) == 3
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ya = torch.cat([y for _, y in digits.batches("train", 100, shuffle=True, generator=gen_a)])
    yb = torch.cat([y for _, y in digits.batches("train", 100, shuffle=True, generator=gen_b)])
    assert torch.equal(ya, yb)
    assert not torch.equal(ya, digits.train.labels)
    assert torch.equal(ya.sort().values, digits.train.labels.sort().values)


def _as_bytes(data, x):
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _explain(original, augmented, pad):
    """Return (dy, dx, flipped) for which `augmented` is a zero-padded crop of `original`, or None."""
    c, s, _ = original.shape
    padded = torch.zeros(c, s + 2 * pad, s + 2 * pad, dtype=original.dtype)
    padded[:, pad:pad + s, pad:pad + s] = original
    for flipped in (False, True):
        source = padded.flip(-1) if flipped else padded
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                if torch.equal(source[:, dy:dy + s, dx:dx + s], augmented):
                    return dy, dx, flipped
    return None


def _augmented_pairs(data, n):
    plain = next(data.batches("train", n, shuffle=True, generator=torch.Generator().manual_seed(5)))
    aug = next(data.batches("train", n, shuffle=True, augment=True, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(plain[1], aug[1])
    return _as_bytes(data, plain[0]), _as_bytes(data, aug[0])


def test_augmentation_crops_and_flips(npz_folder):
    data = load_dataset(f"npz:{npz_folder}")
    plain, aug = _augmented_pairs(data, 40)
    assert aug.shape == plain.shape
    assert not torch.equal(aug, plain)
    found = [_explain(p, a, pad=16 // 8) for p, a in zip(plain, aug)]
    assert all(f is not None for f in found), "augmented image is not a padded crop of the original"
    assert any(f[2] for f in found) and any(not f[2] for f in found)
    assert len({f[:2] for f in found}) > 3  # several different crop offsets


def _is_unflipped_crop(original, augmented, pad):
    c, s, _ = original.shape
    padded = torch.zeros(c, s + 2 * pad, s + 2 * pad, dtype=original.dtype)
    padded[:, pad:pad + s, pad:pad + s] = original
    return any(torch.equal(padded[:, dy:dy + s, dx:dx + s], augmented)
               for dy in range(2 * pad + 1) for dx in range(2 * pad + 1))


def test_digits_augmentation_never_flips(digits):
    plain, aug = _augmented_pairs(digits, 60)
    assert not torch.equal(aug, plain)
    # Digits are not mirror-symmetric, so any flip would break this for some sample.
    assert all(_is_unflipped_crop(p, a, pad=16 // 8) for p, a in zip(plain, aug))


def test_augmentation_only_on_train(digits):
    a = next(digits.batches("val", 32, augment=True))[0]
    b = next(digits.batches("val", 32))[0]
    assert torch.equal(a, b)


def test_dataset_pickles_without_device_cache(digits):
    clone = pickle.loads(pickle.dumps(digits))
    assert torch.equal(clone.train.images, digits.train.images)
    assert clone._device_cache == {}


# ------------------------------------------------------------------ npz

def test_npz_grey_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (30, 12, 12), dtype=np.uint8), np.arange(30) % 3)
    test = (rng.integers(0, 256, (9, 12, 12), dtype=np.uint8), np.arange(9) % 3)
    folder = write_npz(tmp_path / "grey", train, test, classes=np.array(["a", "b", "c", "d"]))
    data = load_dataset(f"npz:{folder}", val_fraction=0.2)
    assert data.in_channels == 1 and data.image_size == 12 and data.num_classes == 4
    assert len(data.train) == 24 and len(data.val) == 6 and len(data.test) == 9
    assert data.flip is True
    # The NHW -> NCHW conversion keeps pixel values.
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(test[0]))


def test_npz_resize(npz_folder):
    data = load_dataset(f"npz:{npz_folder}", image_size=8)
    assert data.image_size == 8 and tuple(data.train.images.shape[1:]) == (3, 8, 8)
    assert tuple(data.test.images.shape[1:]) == (3, 8, 8)


def test_npz_num_classes_from_labels(npz_folder):
    assert load_dataset(f"npz:{npz_folder}").num_classes == 4


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason="shared CIFAR-10 copy not present")
def test_shared_cifar10_npz():
    data = load_dataset(f"npz:{SHARED_CIFAR}", val_fraction=0.1)
    assert (len(data.train), len(data.val), len(data.test)) == (27000, 3000, 10000)
    assert data.num_classes == 10 and data.in_channels == 3 and data.image_size == 32
    assert tuple(data.train.images.shape[1:]) == (3, 32, 32)
    # Typical CIFAR-10 statistics.
    assert all(0.4 < m < 0.55 for m in data.mean) and all(0.2 < s < 0.3 for s in data.std)
    assert torch.all(torch.bincount(data.val.labels, minlength=10) == 300)


# ------------------------------------------------------------------ imagefolder

def _write_pngs(folder, per_class, mode):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(folder / cls, exist_ok=True)
        for i in range(per_class):
            shape = (10, 14) if mode == "L" else (10, 14, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / cls / f"{i}.png")


def test_imagefolder_carves_test_and_detects_grey(tmp_path):
    _write_pngs(tmp_path / "grey", 10, "L")
    data = load_dataset(f"imagefolder:{tmp_path / 'grey'}", image_size=8, val_fraction=0.25)
    assert data.in_channels == 1 and data.image_size == 8 and data.num_classes == 2
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 16


def test_imagefolder_train_test_subfolders(tmp_path):
    _write_pngs(tmp_path / "rgb" / "train", 6, "RGB")
    _write_pngs(tmp_path / "rgb" / "test", 2, "RGB")
    data = load_dataset(f"imagefolder:{tmp_path / 'rgb'}", val_fraction=0.5)
    assert data.in_channels == 3 and data.image_size == 32
    assert (len(data.train), len(data.val), len(data.test)) == (6, 6, 4)


# ------------------------------------------------------------------ bad input

def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match="digits.*cifar10.*npz:"):
        load_dataset("mnist")
    assert "digits" in dataset_names()


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "0.1"])
def test_bad_val_fraction(fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("digits", val_fraction=fraction)


def test_bad_image_size():
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="needs a folder"):
        load_dataset("npz:")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


def test_missing_test_file(tmp_path):
    np.savez(tmp_path / "train.npz", images=id_images(10), labels=np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match="test.npz"):
        load_dataset(f"npz:{tmp_path}")


def test_cifar_without_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def _good_train():
    return id_images(20), np.arange(20) % 2


def _good_test():
    return id_images(6, offset=100), np.arange(6) % 2


@pytest.mark.parametrize("train, match", [
    ((id_images(20).astype(np.float32), np.arange(20) % 2), "uint8"),
    ((id_images(20).transpose(0, 3, 1, 2).copy(), np.arange(20) % 2), "channels"),
    ((np.zeros((20, 256), dtype=np.uint8), np.arange(20) % 2), "NHWC"),
    ((id_images(20), np.arange(20) % 2 + 0.5), "integer"),
    ((id_images(20), np.arange(19) % 2), "20 images but 19 labels"),
    ((id_images(20), np.arange(20) - 1), ">= 0"),
    ((id_images(0), np.zeros(0, dtype=np.int64)), "empty"),
    ((id_images(20)[:, :, :10], np.arange(20) % 2), "not square"),
])
def test_bad_npz_arrays(tmp_path, train, match):
    folder = write_npz(tmp_path / "bad", train, _good_test())
    with pytest.raises(DataError, match=match):
        load_dataset(f"npz:{folder}")


def test_label_out_of_range_for_classes(tmp_path):
    folder = write_npz(tmp_path / "bad", _good_train(), (id_images(6), np.array([0, 1, 2, 0, 1, 5])),
                       classes=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match="label 5 is out of range for 3 classes"):
        load_dataset(f"npz:{folder}")


def test_unreadable_npz(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "train.npz").write_bytes(b"not a zip file at all")
    np.savez(folder / "test.npz", images=id_images(4), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="train.npz"):
        load_dataset(f"npz:{folder}")
    # Object arrays need pickle, which is never allowed.
    np.savez(folder / "train.npz", images=np.array([None] * 3, dtype=object), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{folder}")
    np.savez(folder / "train.npz", pictures=id_images(4), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match="images"):
        load_dataset(f"npz:{folder}")


def test_val_fraction_that_empties_a_split(tmp_path):
    folder = write_npz(tmp_path / "tiny", (id_images(3), np.array([0, 1, 0])), _good_test())
    with pytest.raises(DataError, match="empty validation split"):
        load_dataset(f"npz:{folder}", val_fraction=0.1)
    with pytest.raises(DataError, match="empty training split"):
        load_dataset(f"npz:{folder}", val_fraction=0.9)


def test_bad_batch_arguments(digits):
    with pytest.raises(DataError, match="unknown split"):
        digits.batches("holdout", 8)
    with pytest.raises(ConfigError, match="batch_size"):
        digits.batches("train", 0)
    with pytest.raises(ConfigError, match="limit"):
        digits.batches("train", 8, limit=-1)


def test_split_seed_keeps_the_validation_rows_across_run_seeds():
    """Runs with different --seed on one base model must validate on the same rows
    (the base model's own split), not on rows it was trained on."""
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.problem import load_data
    from rlpruner_ray.search.workers import env_settings
    fixed = [CompressConfig(seed=s, split_seed=0) for s in (0, 2)]
    a, b = (load_data(c) for c in fixed)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert env_settings(fixed[1])["dataset"]["seed"] == 0
    moved = load_data(CompressConfig(seed=2))
    assert not torch.equal(a.val.images, moved.val.images)            # default: the split follows --seed


# ------------------------------------------------------------------ selection and final halves of test

def test_selection_and_final_halves_cover_test_disjoint_stratified_and_fixed(tmp_path):
    labels = np.arange(40) % 4
    folder = write_npz(tmp_path / "ds", (id_images(200), np.arange(200) % 4), (id_images(40, offset=1000), labels))
    halves = [load_dataset(f"npz:{folder}", seed=seed).with_selection(0.5) for seed in (0, 3)]
    data = halves[0]
    selection, final, test = ids_of(data.selection), ids_of(data.final), ids_of(data.test)
    assert len(selection) == len(data.selection) == 20 and len(final) == len(data.final) == 20
    assert selection.isdisjoint(final) and selection | final == test == set(range(1000, 1040))
    # stratified: every class split exactly in half (10 test images each)
    assert torch.bincount(data.selection.labels).tolist() == [5, 5, 5, 5]
    assert torch.bincount(data.final.labels).tolist() == [5, 5, 5, 5]
    # the same halves whatever the run's seed
    other = halves[1]
    assert torch.equal(other.selection.images, data.selection.images)
    assert torch.equal(other.final.images, data.final.images)
    assert data.final_split == "final"
    # batches of a half are its images, in order
    x, y = next(data.batches("selection", 100))
    assert torch.equal(y, data.selection.labels) and len(x) == 20


def test_no_selection_keeps_the_test_split_whole(digits):
    same = digits.with_selection(0)
    assert same is digits and digits.selection is None and digits.final_split == "test"
    with pytest.raises(DataError, match="selection_fraction > 0"):
        digits.split("selection")
    with pytest.raises(ConfigError, match="selection_fraction"):
        digits.with_selection(1.0)


def test_digits_halves_are_stratified(digits):
    data = digits.with_selection(0.5)
    assert len(data.selection) + len(data.final) == len(digits.test) == 359
    per_class = torch.bincount(digits.test.labels, minlength=10).double() * 0.5
    assert torch.all((torch.bincount(data.selection.labels, minlength=10).double() - per_class).abs() <= 1.0)
    # the undivided dataset is unchanged (the halves live on a copy)
    assert digits.selection is None
