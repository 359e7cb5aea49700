"""Image dataset loaders: each test writes tiny files in the real on-disk format and loads them through
the production code (torchvision classes included)."""
import gzip
import importlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from scipy.io import savemat
from torch.utils.data.distributed import DistributedSampler

import data_loaders.image_datasets as ids
from helpers import write_imagefolder
from data_loaders.image_datasets import (
    DataNotFoundError,
    build_datasets,
    build_loaders,
    list_datasets,
    read_idx,
)

T = pytest.importorskip("torchvision.transforms")


# --------------------------------------------------------------------------------------------------
# helpers writing the real formats
# --------------------------------------------------------------------------------------------------
def _existence_only(monkeypatch, module_name):
    """torchvision verifies the md5 of the *real* files; tiny test files cannot match it. Replace the
    check by an existence check in the given torchvision module for this test only."""
    module = importlib.import_module(f"torchvision.datasets.{module_name}")
    monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _write_cifar(root, hundred: bool, n_per_file: int, seed: int = 0):
    """CIFAR python pickles: dict with 'data' uint8 [N, 3072] (CHW rows) and 'labels'/'fine_labels'."""
    rng = np.random.default_rng(seed)
    num_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=n_per_file).tolist()
        entry = {"batch_label": name, "data": data, "filenames": [f"{name}_{i}.png" for i in range(n_per_file)]}
        if hundred:
            entry.update(fine_labels=labels, coarse_labels=[lab // 5 for lab in labels])
        else:
            entry["labels"] = labels
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[name] = (data, labels)
    meta = ({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
            if hundred else {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_per_file})
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def _write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_fashion(directory, n_train, n_test, gz, seed):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        _write_idx(directory / name, array, gz)
    return arrays


def _normalised(chw_uint8: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(chw_uint8.astype(np.float32) / 255.0)
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _types(transform):
    return [type(t).__name__ for t in transform.transforms]


# --------------------------------------------------------------------------------------------------
# registry and errors
# --------------------------------------------------------------------------------------------------
def test_registry_lists_every_dataset_and_rejects_unknown_names():
    assert set(list_datasets()) == {"CIFAR10", "CIFAR100", "SVHN", "ImageNet", "FashionMNIST", "digits",
                                    "synthetic"}
    with pytest.raises(ValueError, match="unknown dataset 'MNISTT'.*CIFAR10"):
        build_datasets("MNISTT", "data")
    with pytest.raises(ValueError, match="does not accept option"):
        build_datasets("digits", "data", use_extra=True)


@pytest.mark.parametrize("name, expected", [
    ("CIFAR10", ["cifar-10-batches-py", "data_batch_1", "batches.meta", "dataset.download=true"]),
    ("CIFAR100", ["cifar-100-python", "train", "meta"]),
    ("SVHN", ["train_32x32.mat", "test_32x32.mat", "dataset.download=true"]),
    ("ImageNet", ["train/<class>/*.JPEG", "val/<class>/*.JPEG"]),
])
def test_missing_data_raises_one_clear_error(tmp_path, name, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        build_datasets(name, root)
    message = str(info.value)
    assert str(root) in message
    for fragment in expected:
        assert fragment in message
    assert isinstance(info.value, FileNotFoundError)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------
def test_cifar10_pickles_load_with_paper_normalisation(tmp_path, monkeypatch):
    _existence_only(monkeypatch, "cifar")
    written = _write_cifar(tmp_path, hundred=False, n_per_file=4)
    splits = build_datasets("CIFAR10", tmp_path, val_size=5, split_seed=1)
    assert (splits.num_classes, splits.in_channels, splits.image_size, splits.name) == (10, 3, 32, "CIFAR10")
    assert len(splits.train) == 15 and len(splits.val) == 5 and len(splits.test) == 4

    # test: ToTensor + Normalize with the original std (0.2023, 0.2010, 0.1971), exactly
    data, labels = written["test_batch"]
    image, label = splits.test[2]
    expected = _normalised(data[2].reshape(3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.2010, 0.1971))
    torch.testing.assert_close(image, expected)
    assert label == labels[2]

    # val comes from the training batches, in order data_batch_1..5
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    j = splits.val.indices[0]
    image, label = splits.val[0]
    torch.testing.assert_close(image, _normalised(train_data[j].reshape(3, 32, 32), ids.CIFAR10_MEAN, ids.CIFAR10_STD))
    assert label == train_labels[j]

    assert _types(splits.train.transform) == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert splits.train.transform.transforms[0].padding == 4
    assert splits.train[0][0].shape == (3, 32, 32)


def test_cifar100_pickles_and_224_recipe(tmp_path, monkeypatch):
    _existence_only(monkeypatch, "cifar")
    written = _write_cifar(tmp_path, hundred=True, n_per_file=6)
    splits = build_datasets("CIFAR100", tmp_path, val_size=0, image_size=40)
    assert splits.val is None and splits.num_classes == 100 and splits.image_size == 40
    assert len(splits.train) == 6 and len(splits.test) == 6
    assert splits.test[1][1] == written["test"][1][1]
    assert splits.train[0][0].shape == (3, 40, 40) and splits.test[0][0].shape == (3, 40, 40)
    assert _types(splits.test.transform) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert splits.test.transform.transforms[0].size == round(40 * 256 / 224)
    torch.testing.assert_close(splits.test.transform.transforms[-1].std, (0.2675, 0.2565, 0.2761))


def test_cifar_checksum_failure_is_a_data_not_found_error(tmp_path):
    # no monkeypatch: the production path runs torchvision's md5 check, which the tiny files fail
    _write_cifar(tmp_path, hundred=False, n_per_file=2)
    with pytest.raises(DataNotFoundError, match="md5") as info:
        build_datasets("CIFAR10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


# --------------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------------
def _write_svhn(root, split, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 stands for digit 0
    y[0, 0] = 10
    savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
    return x, y


def test_svhn_mat_files_map_label_10_to_0_without_flip(tmp_path, monkeypatch):
    _existence_only(monkeypatch, "svhn")
    _write_svhn(tmp_path, "train", 8, 0)
    x, y = _write_svhn(tmp_path, "test", 5, 1)
    splits = build_datasets("SVHN", tmp_path, val_size=0.25, split_seed=3)
    assert len(splits.train) == 6 and len(splits.val) == 2 and len(splits.test) == 5
    image, label = splits.test[0]
    assert label == 0
    assert [splits.test[i][1] for i in range(5)] == [int(v) % 10 for v in y[:, 0]]
    expected = _normalised(x[..., 0].transpose(2, 0, 1), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    torch.testing.assert_close(image, expected)
    assert "RandomHorizontalFlip" not in _types(splits.train.transform)
    assert _types(splits.train.transform)[0] == "RandomCrop"

    with pytest.raises(DataNotFoundError, match="extra_32x32.mat"):
        build_datasets("SVHN", tmp_path, use_extra=True)
    _write_svhn(tmp_path, "extra", 4, 2)
    assert len(build_datasets("SVHN", tmp_path, val_size=0, use_extra=True).train) == 12


# --------------------------------------------------------------------------------------------------
# ImageNet folder
# --------------------------------------------------------------------------------------------------
COLOURS = {"n01": (255, 0, 128), "n02": (0, 64, 255)}


def _write_imagefolder(root, split, per_class, classes=COLOURS):
    for cls, colour in classes.items():
        (root / split / cls).mkdir(parents=True)
        for i in range(per_class):
            fmt = "PNG" if i % 2 == 0 else "JPEG"
            Image.new("RGB", (20 + i, 24), colour).save(root / split / cls / f"img{i}.{fmt}", format=fmt)


def test_imagenet_imagefolder(tmp_path):
    _write_imagefolder(tmp_path, "train", 3)
    _write_imagefolder(tmp_path, "val", 2)
    splits = build_datasets("ImageNet", tmp_path, val_size=2, image_size=16)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 16)
    assert len(splits.train) == 4 and len(splits.val) == 2 and len(splits.test) == 4
    image, label = splits.test[0]  # val/n01/img0.PNG: a constant (255, 0, 128) image
    assert image.shape == (3, 16, 16) and label == 0
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(ids.IMAGENET_MEAN)) / torch.tensor(ids.IMAGENET_STD)
    torch.testing.assert_close(image[:, 8, 8], expected)
    assert [splits.test[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert splits.train[0][0].shape == (3, 16, 16)
    assert _types(splits.train.transform)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert splits.test.transform.transforms[0].size == 18  # 16 * 256 / 224 rounded

    default = build_datasets("ImageNet", tmp_path, val_size=0)
    assert default.image_size == 224 and default.test.transform.transforms[0].size == 256
    assert default.test[0][0].shape == (3, 224, 224)


def test_imagenet_folder_errors(tmp_path):
    _write_imagefolder(tmp_path, "train", 1)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataNotFoundError, match="no usable images") as info:
        build_datasets("ImageNet", tmp_path)
    assert str(tmp_path / "val") in str(info.value)
    _write_imagefolder(tmp_path, "val", 1, classes={"n01": (1, 2, 3), "n03": (4, 5, 6)})
    with pytest.raises(ValueError, match="class folders differ"):
        build_datasets("ImageNet", tmp_path)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_image_is_an_error_naming_it(tmp_path, num_workers):
    """A truncated JPEG ("Truncated File Read" from PIL) names the image and says what to do, also when it is
    read in a DataLoader worker; it stays an OSError."""
    write_imagefolder(tmp_path, classes=2, per_class=4, size=20)
    bad = tmp_path / "val" / "n00000001" / "img1.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    splits = build_datasets("ImageNet", tmp_path, val_size=0, image_size=16)
    loader = torch.utils.data.DataLoader(splits.test, batch_size=2, num_workers=num_workers)
    with pytest.raises(OSError) as info:
        for _ in loader:
            pass
    assert isinstance(info.value, ids.BadImageError)
    message = str(info.value)
    assert str(bad) in message and "truncated" in message.lower()
    assert "Remove it from the dataset folder or replace it" in message
    if num_workers == 0:
        assert info.value.filename == str(bad) and isinstance(info.value.__cause__, OSError)
    good = build_datasets("ImageNet", tmp_path, val_size=0, image_size=16).test
    assert good[0][0].shape == (3, 16, 16)  # the other images still load


# --------------------------------------------------------------------------------------------------
# FashionMNIST idx files
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_torchvision_raw_layout(tmp_path, gz):
    arrays = _write_fashion(tmp_path / "FashionMNIST" / "raw", 10, 6, gz, seed=0)
    splits = build_datasets("FashionMNIST", tmp_path, val_size=0.2, debian_dir=tmp_path / "no_debian")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert len(splits.train) == 8 and len(splits.val) == 2 and len(splits.test) == 6
    image, label = splits.test[3]
    torch.testing.assert_close(image, _normalised(arrays["t10k-images-idx3-ubyte"][3][None], (0.2860,), (0.3530,)))
    assert label == arrays["t10k-labels-idx1-ubyte"][3]
    assert _types(splits.train.transform) == ["RandomCrop", "RandomHorizontalFlip", "Normalize"]
    assert splits.train.transform.transforms[0].padding == 2
    assert splits.train[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_debian_layout_and_precedence(tmp_path, gz):
    debian = tmp_path / "debian"
    arrays = _write_fashion(debian, 5, 4, gz, seed=1)
    splits = build_datasets("FashionMNIST", tmp_path / "root", val_size=0, debian_dir=debian)
    assert len(splits.train) == 5 and len(splits.test) == 4
    assert [splits.train[i][1] for i in range(5)] == arrays["train-labels-idx1-ubyte"].tolist()
    # files in the torchvision layout under root win over the Debian directory
    raw = _write_fashion(tmp_path / "root" / "FashionMNIST" / "raw", 7, 3, not gz, seed=2)
    splits = build_datasets("FashionMNIST", tmp_path / "root", val_size=0, debian_dir=debian)
    assert len(splits.train) == 7
    assert [splits.test[i][1] for i in range(3)] == raw["t10k-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_missing_and_corrupt(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        build_datasets("FashionMNIST", tmp_path / "root", debian_dir=tmp_path / "deb")
    message = str(info.value)
    for fragment in (str(tmp_path / "root" / "FashionMNIST" / "raw"), str(tmp_path / "deb"),
                     "t10k-images-idx3-ubyte", "dataset-fashion-mnist"):
        assert fragment in message
    _write_fashion(tmp_path / "deb", 5, 4, False, seed=0)
    path = tmp_path / "deb" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        build_datasets("FashionMNIST", tmp_path / "root", debian_dir=tmp_path / "deb")
    path.write_bytes(b"\x00\x00\x0d\x03" + bytes(20))
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        read_idx(path)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ids.DEBIAN_FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_package(tmp_path):
    splits = build_datasets("FashionMNIST", tmp_path, val_size=0)
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    images = splits.train.base.images.float() / 255
    assert abs(images.mean().item() - 0.2860) < 1e-3 and abs(images.std().item() - 0.3530) < 1e-3
    assert torch.bincount(splits.test.base.labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------------
# digits and synthetic
# --------------------------------------------------------------------------------------------------
def test_digits_fixed_split_and_normalisation():
    # lazily, as in data_loaders.image_datasets: scikit-learn's import costs about 2 s
    from sklearn.datasets import load_digits

    full = build_datasets("digits", "unused", val_size=0)
    assert len(full.train) == 1437 and len(full.test) == 360
    assert (full.num_classes, full.in_channels, full.image_size) == (10, 1, 8)
    other = build_datasets("digits", "unused", val_size=100, split_seed=7)
    # the train/test split does not move with split_seed; val is carved from train only
    assert torch.equal(other.test.base.images, full.test.base.images)
    assert len(other.train) == 1337 and len(other.val) == 100
    digits = load_digits()
    scaled = digits.images / 16.0
    assert abs(scaled.mean() - ids.DIGITS_MEAN[0]) < 1e-3 and abs(scaled.std() - ids.DIGITS_STD[0]) < 1e-3
    image, label = full.test[0]
    raw = full.test.base.images[0]
    torch.testing.assert_close(image, (raw - ids.DIGITS_MEAN[0]) / ids.DIGITS_STD[0])
    # every test image is one of sklearn's images with its own label
    match = np.flatnonzero((np.abs(scaled - raw[0].numpy()) < 1e-6).all(axis=(1, 2)))
    assert label in digits.target[match]
    assert full.train[0][0].shape == (1, 8, 8)


def test_synthetic_is_seeded_and_learnable():
    options = dict(num_classes=4, in_channels=2, image_size=12, train_size=200, test_size=80, seed=5)
    splits = build_datasets("synthetic", "unused", val_size=0, synthetic=options)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (4, 2, 12)
    assert len(splits.train) == 200 and len(splits.test) == 80
    again = build_datasets("synthetic", "unused", val_size=0, synthetic=options)
    assert torch.equal(splits.test.base.images, again.test.base.images)
    other = build_datasets("synthetic", "unused", val_size=0, synthetic={**options, "seed": 6})
    assert not torch.equal(splits.test.base.images, other.test.base.images)
    # nearest class mean of the training images classifies the test set: the classes are learnable
    x, y = splits.train.base.images.flatten(1), splits.train.base.labels
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    xt, yt = splits.test.base.images.flatten(1), splits.test.base.labels
    accuracy = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert accuracy > 0.9
    assert torch.bincount(yt, minlength=4).tolist() == [20] * 4
    with pytest.raises(ValueError, match="contradicts"):
        build_datasets("synthetic", "unused", image_size=8, synthetic={"image_size": 12})


# --------------------------------------------------------------------------------------------------
# validation split
# --------------------------------------------------------------------------------------------------
def _synthetic(**kw):
    return build_datasets("synthetic", "unused", synthetic=dict(num_classes=3, image_size=8, train_size=60,
                                                                test_size=30), **kw)


def test_val_split_is_disjoint_deterministic_and_uses_eval_transforms():
    a = _synthetic(val_size=0.25, split_seed=0)
    b = _synthetic(val_size=0.25, split_seed=0)
    c = _synthetic(val_size=0.25, split_seed=1)
    assert len(a.val) == 15 and len(a.train) == 45
    assert set(a.train.indices).isdisjoint(a.val.indices)
    assert sorted(a.train.indices.tolist() + a.val.indices.tolist()) == list(range(60))
    assert np.array_equal(a.val.indices, b.val.indices) and not np.array_equal(a.val.indices, c.val.indices)
    assert a.train.base is a.val.base  # one copy of the training data
    # val: eval transform (deterministic, un-augmented), train: augmentation
    assert a.val.transform is None and a.train.transform is not None
    j = a.val.indices[0]
    assert torch.equal(a.val[0][0], a.train.base[j][0])
    torch.manual_seed(0)
    k = a.train.indices[0]
    assert any(not torch.equal(a.train[0][0], a.train.base[k][0]) for _ in range(10))


# The splits as the code made them when subsets held Python lists (synthetic, 60 training images): the move to
# numpy index arrays must keep every index and its order.
OLD_VAL_15_SEED_0 = [2, 3, 9, 11, 19, 25, 31, 34, 35, 43, 44, 47, 48, 49, 53]
OLD_TRAIN_20_OF_45_SEED_0 = [0, 4, 6, 7, 13, 17, 20, 21, 26, 27, 33, 37, 39, 40, 45, 52, 55, 56, 58, 59]
OLD_TRAIN_10_OF_60_SEED_0 = [1, 4, 11, 14, 25, 28, 35, 48, 56, 59]


def test_subset_indices_are_int64_arrays_equal_to_the_old_lists():
    a = _synthetic(val_size=15, split_seed=0)
    for subset in (a.train, a.val):
        assert isinstance(subset.indices, np.ndarray) and subset.indices.dtype == np.int64
        assert subset.indices.ndim == 1
    assert a.val.indices.tolist() == OLD_VAL_15_SEED_0
    assert a.train.indices.tolist() == [i for i in range(60) if i not in OLD_VAL_15_SEED_0]
    assert _synthetic(val_size=15, split_seed=0, train_size=20).train.indices.tolist() == OLD_TRAIN_20_OF_45_SEED_0
    assert _synthetic(val_size=0, split_seed=0, train_size=10).train.indices.tolist() == OLD_TRAIN_10_OF_60_SEED_0
    assert a.test.indices is None  # the whole test set, unindexed
    # items are the base's at those indices (a numpy integer never reaches the base dataset)
    for position, index in ((0, OLD_VAL_15_SEED_0[0]), (14, OLD_VAL_15_SEED_0[14])):
        image, label = a.val[position]
        assert type(label) is int and label == int(a.val.base.labels[index])
        assert torch.equal(image, a.val.base[index][0])


def test_val_split_uses_eval_pipeline_for_pil_datasets(tmp_path):
    _write_imagefolder(tmp_path, "train", 3)
    _write_imagefolder(tmp_path, "val", 1)
    splits = build_datasets("ImageNet", tmp_path, val_size=0.5, image_size=16)
    assert splits.val.transform is splits.test.transform
    assert _types(splits.val.transform)[:2] == ["Resize", "CenterCrop"]


@pytest.mark.parametrize("bad", [1.5, -0.1, 60, 100, "0.1", True])
def test_val_size_validation(bad):
    with pytest.raises(ValueError, match="val_size"):
        _synthetic(val_size=bad)


def test_val_size_zero_means_no_val():
    splits = _synthetic(val_size=0)
    assert splits.val is None and len(splits.train) == 60
    assert build_loaders(splits, 8, 16).val is None


# --------------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------------
def _epoch_labels(loader):
    return torch.cat([y for _, y in loader])


def test_loader_shapes_order_and_seeded_shuffle():
    splits = _synthetic(val_size=10)
    loaders = build_loaders(splits, batch_size=16, eval_batch_size=25, seed=3)
    x, y = next(iter(loaders.train))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.shape == (16,) and y.dtype == torch.int64
    x, y = next(iter(loaders.test))
    assert x.shape == (25, 3, 8, 8)
    # val/test are not shuffled
    assert _epoch_labels(loaders.test).tolist() == [splits.test[i][1] for i in range(30)]
    assert _epoch_labels(loaders.val).tolist() == [splits.val[i][1] for i in range(10)]
    # seeded train order is reproducible (epoch after epoch), and differs for another seed
    fresh = build_loaders(splits, batch_size=16, eval_batch_size=25, seed=3)
    again = build_loaders(splits, batch_size=16, eval_batch_size=25, seed=3)
    other = build_loaders(splits, batch_size=16, eval_batch_size=25, seed=4)
    first = [_epoch_labels(fresh.train) for _ in range(2)]
    assert [_epoch_labels(again.train).tolist() for _ in range(2)] == [f.tolist() for f in first]
    assert _epoch_labels(other.train).tolist() != first[0].tolist()
    assert first[0].tolist() != first[1].tolist()  # reshuffled every epoch


def test_seeded_loader_with_workers_reproduces_augmented_batches():
    splits = _synthetic(val_size=0)
    batches = []
    for _ in range(2):
        loader = build_loaders(splits, batch_size=20, eval_batch_size=20, num_workers=1, seed=11).train
        batches.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(batches[0], batches[1])


def test_only_the_train_loader_keeps_persistent_workers():
    splits = _synthetic(val_size=10)
    loaders = build_loaders(splits, batch_size=16, eval_batch_size=25, num_workers=1, seed=3)
    assert loaders.train.persistent_workers
    assert not loaders.val.persistent_workers and not loaders.test.persistent_workers
    no_workers = build_loaders(splits, 16, 25)
    assert not any(l.persistent_workers for l in (no_workers.train, no_workers.val, no_workers.test))
    # persistent workers still give every epoch its own order, and two seeded loaders the same epochs
    again = build_loaders(splits, batch_size=16, eval_batch_size=25, num_workers=1, seed=3)
    first = [_epoch_labels(loaders.train).tolist() for _ in range(2)]
    assert first[0] != first[1] and [_epoch_labels(again.train).tolist() for _ in range(2)] == first


def test_distributed_loaders_use_distributed_sampler(tmp_path):
    splits = _synthetic(val_size=10)
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_loaders(splits, 8, 8, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loaders = build_loaders(splits, 8, 8, seed=2, distributed=True)
        assert all(isinstance(l.sampler, DistributedSampler) for l in (loaders.train, loaders.val, loaders.test))
        assert loaders.train.sampler.shuffle and not loaders.test.sampler.shuffle
        loaders.set_epoch(0)
        epoch0 = _epoch_labels(loaders.train).tolist()
        loaders.set_epoch(1)
        assert sorted(_epoch_labels(loaders.train).tolist()) == sorted(epoch0)
        assert list(iter(loaders.train.sampler)) != list(range(50))
        loaders.set_epoch(0)
        assert _epoch_labels(loaders.train).tolist() == epoch0
        assert _epoch_labels(loaders.test).tolist() == [splits.test[i][1] for i in range(30)]
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# train_size and the in-memory resize (CPU-sized benchmark tasks)
# --------------------------------------------------------------------------------------------------
def test_train_size_keeps_a_seeded_subset_disjoint_from_val():
    full = _synthetic(val_size=15, split_seed=0)
    small = _synthetic(val_size=15, split_seed=0, train_size=20)
    assert len(small.train) == 20 and len(set(small.train.indices)) == 20
    # a subset of what the validation split left; val and test are unchanged
    assert set(small.train.indices) <= set(full.train.indices)
    assert np.array_equal(small.val.indices, full.val.indices)
    assert set(small.train.indices).isdisjoint(small.val.indices)
    assert len(small.test) == len(full.test) == 30
    assert small.train.indices.tolist() == sorted(small.train.indices)
    # deterministic for a split_seed, another seed draws another subset (and another val split)
    assert np.array_equal(_synthetic(val_size=15, split_seed=0, train_size=20).train.indices, small.train.indices)
    other = _synthetic(val_size=15, split_seed=1, train_size=20)
    assert not np.array_equal(other.train.indices, small.train.indices)
    assert set(other.train.indices).isdisjoint(other.val.indices)
    # the items are the base's images at those indices, with the train augmentation attached
    assert torch.equal(small.train.base.images, full.train.base.images)
    assert type(small.train.transform) is type(full.train.transform)
    j = small.train.indices[0]
    assert small.train[0][1] == int(small.train.base.labels[j])
    # every image left after the validation split is allowed; no validation split: a subset of all 60
    assert sorted(_synthetic(val_size=15, train_size=45).train.indices) == sorted(full.train.indices)
    no_val = _synthetic(val_size=0, train_size=10)
    assert no_val.val is None and len(no_val.train) == 10 and set(no_val.train.indices) <= set(range(60))
    assert len(build_loaders(small, 8, 8).train.dataset) == 20


@pytest.mark.parametrize("val_size, train_size, match", [
    (15, 46, "train_size=46 exceeds the 45"),
    (0, 61, "train_size=61 exceeds the 60"),
    (15, 0, "train_size"), (15, -3, "train_size"), (15, 2.5, "train_size"), (15, True, "train_size"),
])
def test_bad_train_size_is_a_clear_error(val_size, train_size, match):
    with pytest.raises(ValueError, match=match):
        _synthetic(val_size=val_size, train_size=train_size)


def test_fashion_mnist_resized_in_memory(tmp_path):
    arrays = _write_fashion(tmp_path / "FashionMNIST" / "raw", 12, 5, gz=True, seed=3)
    native = build_datasets("FashionMNIST", tmp_path, val_size=4, debian_dir=tmp_path / "no_debian")
    splits = build_datasets("FashionMNIST", tmp_path, val_size=4, image_size=14, debian_dir=tmp_path / "no_debian")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 14)
    assert splits.train.base.images.shape == (12, 1, 14, 14) and splits.train.base.images.dtype == torch.uint8
    assert splits.test.base.images.shape == (5, 1, 14, 14)
    for split in ("train", "val", "test"):
        resized, full = getattr(splits, split), getattr(native, split)
        assert len(resized) == len(full)
        for i in range(len(resized)):
            image, label = resized[i]
            assert image.shape == (1, 14, 14) and image.dtype == torch.float32
            assert label == full[i][1]
    assert [splits.test[i][1] for i in range(5)] == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert np.array_equal(splits.val.indices, native.val.indices)
    # the eval pipeline only normalises the resized uint8 image
    torch.testing.assert_close(splits.test[2][0], _normalised(splits.test.base.images[2].numpy(), (0.2860,),
                                                               (0.3530,)))
    # a downscale: every 14x14 pixel lies within the range of the 2x2 block it comes from (+- rounding), and the
    # image keeps its mean brightness
    original = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32))
    small = splits.test.base.images[:, 0].float()
    blocks = original.unfold(1, 2, 2).unfold(2, 2, 2)  # [N, 14, 14, 2, 2]
    assert (small.mean(dim=(1, 2)) - original.mean(dim=(1, 2))).abs().max() < 3.0
    lo, hi = blocks.amin(dim=(-1, -2)), blocks.amax(dim=(-1, -2))
    assert ((small < lo - 1) | (small > hi + 1)).float().mean() < 0.5  # antialiasing mixes in neighbours
    # train: the CIFAR-style augmentation at the new size (padding scaled 2 -> 1)
    assert _types(splits.train.transform) == ["RandomCrop", "RandomHorizontalFlip", "Normalize"]
    crop = splits.train.transform.transforms[0]
    assert crop.size == (14, 14) and crop.padding == 1
    # train_size works together with the resize (the proxy task's setting)
    both = build_datasets("FashionMNIST", tmp_path, val_size=4, image_size=14, train_size=5,
                          debian_dir=tmp_path / "no_debian")
    assert len(both.train) == 5 and both.train[0][0].shape == (1, 14, 14)


def test_resize_in_memory_keeps_dtype_and_labels():
    images = torch.full((3, 1, 28, 28), 200, dtype=torch.uint8)
    images[1] = 0
    labels = torch.tensor([4, 1, 7])
    out = ids.resize_in_memory(ids.TensorImageDataset(images, labels), 14)
    assert out.images.shape == (3, 1, 14, 14) and out.images.dtype == torch.uint8
    assert torch.equal(out.labels, labels)
    assert (out.images[0] == 200).all() and (out.images[1] == 0).all()  # constant images stay constant
    floats = ids.resize_in_memory(ids.TensorImageDataset(images.float() / 255, labels), 7)
    assert floats.images.dtype == torch.float32 and floats.images.shape == (3, 1, 7, 7)
