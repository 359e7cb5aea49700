"""Image classification datasets and their loaders.

One registry maps a dataset name to a small builder function (timm-style, no if/elif chain over
names). Every builder returns the *untransformed* training and test data plus the train (augmented)
and eval transforms; :func:`build_datasets` then carves a seeded validation split out of the training
data and attaches the transforms, so that

* ``train`` keeps the augmentation,
* ``val`` (a disjoint subset of the *training* data, never the test set) uses the eval transforms,
* ``test`` uses the eval transforms.

Every dataset item is ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` (normalised)
and ``label`` a Python ``int`` in ``[0, num_classes)``.

Datasets (``list_datasets()``):

========================  ==========================================================================
``CIFAR10``/``CIFAR100``  torchvision, ``root/cifar-10-batches-py`` / ``root/cifar-100-python``
``SVHN``                  torchvision, ``root/{train,test}_32x32.mat`` (option ``use_extra``)
``ImageNet``              torchvision ``ImageFolder`` at ``root/train/<class>/*`` and ``root/val/<class>/*``
``FashionMNIST``          idx files in ``root/FashionMNIST/raw/`` or the Debian package directory
``digits``                scikit-learn's bundled 8x8 digits (offline, in memory)
``synthetic``             seeded, learnable class patterns plus noise (offline, in memory)
========================  ==========================================================================

Normalisation and augmentation of CIFAR/SVHN follow the original code exactly
(original-method.md §3.2), ImageNet follows §9.
"""
from __future__ import annotations

import gzip
import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, FashionMNIST, ImageFolder
from torchvision.datasets.folder import default_loader

from utils.io import FileError, describe_os_error
from utils.seed import make_generator, seed_worker

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# --------------------------------------------------------------------------------------------------
# Normalisation constants
# --------------------------------------------------------------------------------------------------
# CIFAR10's std is the original code's (0.2023, 0.2010, 0.1971), not the common (0.2023, 0.1994, 0.2010).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.2010, 0.1971)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Mean/std of all 1,797 scikit-learn digits after scaling 0..16 to [0, 1] (checked by a test).
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_SPLIT_SEED = 0  # fixed: the digits train/test split must not move with `split_seed`
DIGITS_TEST_SIZE = 360


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing (or fail their checksum) and cannot be, or were not allowed to be,
    downloaded. The message names the expected path and how to obtain the data."""


# --------------------------------------------------------------------------------------------------
# Public containers
# --------------------------------------------------------------------------------------------------
@dataclass
class DataSplits:
    """Datasets of one task. Items are ``(image [C, H, W] float, label int)``.

    ``val`` is a seeded subset of the training data with eval transforms, or ``None`` when
    ``val_size == 0``.
    """

    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


@dataclass
class DataLoaders:
    """Loaders of one task: shuffled ``train``, unshuffled ``val`` (or ``None``) and ``test``."""

    train: DataLoader
    val: Optional[DataLoader]
    test: DataLoader

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle DistributedSamplers for ``epoch`` (no-op for non-distributed loaders)."""
        for loader in (self.train, self.val, self.test):
            if loader is not None and isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)


@dataclass
class _Source:
    """What a registered builder returns: raw datasets (no transform) and the two pipelines."""

    train: Dataset
    test: Dataset
    train_transform: Callable
    eval_transform: Callable
    num_classes: int
    in_channels: int
    image_size: int


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., _Source]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator: register ``fn(root, download, image_size, **options) -> _Source`` under ``name``."""

    def wrap(fn: Callable[..., _Source]) -> Callable[..., _Source]:
        if name.lower() in (n.lower() for n in _REGISTRY):
            raise ValueError(f"dataset {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_datasets` (matching is case-insensitive)."""
    return sorted(_REGISTRY, key=str.lower)


def _canonical_name(name: str) -> str:
    for known in _REGISTRY:
        if known.lower() == str(name).lower():
            return known
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")


# --------------------------------------------------------------------------------------------------
# Dataset wrappers
# --------------------------------------------------------------------------------------------------
class TransformedSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image.

    Lets the augmented train split and the eval-transformed val split share one copy of the data.
    ``indices=None`` means all of ``base``; otherwise they are kept as a numpy ``int64`` array (one buffer: a
    Python list of ints would be copied page by page into every forked DataLoader worker as reference counts
    change, ImageNet's 1.27 M indices included).
    """

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]], transform: Optional[Callable]):
        self.base = base
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i if self.indices is None else int(self.indices[i])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


class TensorImageDataset(Dataset):
    """In-memory images ``[N, C, H, W]`` with labels ``[N]``.

    ``uint8`` images are returned as float ``[C, H, W]`` in ``[0, 1]`` (like ``ToTensor``); float images
    are returned unchanged.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be [N, C, H, W] and labels [N]; got {tuple(images.shape)}, "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return image, int(self.labels[i])


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def _resize_for(image_size: int) -> int:
    """Resize side before a centre/random crop of ``image_size`` (256 for 224, as in ImageNet)."""
    return int(round(image_size * 256 / 224))


def _small_image_transforms(native: int, image_size: Optional[int], mean, std, flip: bool,
                            padding: int, from_pil: bool) -> tuple[Callable, Callable]:
    """CIFAR-style pipelines: train = RandomCrop(native, pad) [+ HFlip], eval = identity, then
    ToTensor (PIL inputs only) and Normalize.

    With ``image_size`` other than ``native`` it is the original "CIFAR10(224)" recipe instead:
    train = Resize(s*256/224) + RandomCrop(s) [+ HFlip], eval = Resize(s*256/224) + CenterCrop(s).
    """
    to_tensor = [T.ToTensor()] if from_pil else []
    normalize = T.Normalize(mean, std)
    flips = [T.RandomHorizontalFlip()] if flip else []
    if image_size is None or image_size == native:
        train = T.Compose([T.RandomCrop(native, padding=padding), *flips, *to_tensor, normalize])
        test = T.Compose([*to_tensor, normalize])
    else:
        resize = _resize_for(image_size)
        train = T.Compose([T.Resize(resize), T.RandomCrop(image_size), *flips, *to_tensor, normalize])
        test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *to_tensor, normalize])
    return train, test


# --------------------------------------------------------------------------------------------------
# Helpers for missing data
# --------------------------------------------------------------------------------------------------
def _require_files(what: str, directory: Path, names: Sequence[str], how: str) -> None:
    """Raise one :class:`DataNotFoundError` naming the folder, the expected files and how to get them."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{what} data not found: expected {directory} with files "
                                f"{', '.join(names)} (missing: {', '.join(missing)}). {how}")


def _torchvision_call(make: Callable[[], Dataset], what: str, where: Path, how: str, download: bool) -> Dataset:
    """Run a torchvision constructor, turning its RuntimeError/download errors into DataNotFoundError."""
    try:
        return make()
    except (RuntimeError, OSError) as err:  # OSError covers urllib's URLError when offline
        action = "download failed" if download else "files are present but fail torchvision's md5 check"
        raise DataNotFoundError(f"{what} at {where}: {action} ({err}). {how}") from err


# --------------------------------------------------------------------------------------------------
# CIFAR10 / CIFAR100
# --------------------------------------------------------------------------------------------------
def _build_cifar(cls, name: str, mean, std, root: PathLike, download: bool, image_size: Optional[int]) -> _Source:
    directory = Path(root) / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    how = (f"Pass dataset.download=true to fetch {cls.url}, or extract {cls.filename} into {Path(root)} "
           f"(it creates {cls.base_folder}/).")
    if not download:
        _require_files(name, directory, names, how)
    train = _torchvision_call(lambda: cls(str(root), train=True, download=download), name, directory, how, download)
    test = _torchvision_call(lambda: cls(str(root), train=False, download=False), name, directory, how, download)
    train_tf, test_tf = _small_image_transforms(32, image_size, mean, std, flip=True, padding=4, from_pil=True)
    return _Source(train, test, train_tf, test_tf, len(train.classes), 3, image_size or 32)


@register_dataset("CIFAR10")
def _cifar10(root: PathLike, download: bool, image_size: Optional[int]) -> _Source:
    return _build_cifar(CIFAR10, "CIFAR10", CIFAR10_MEAN, CIFAR10_STD, root, download, image_size)


@register_dataset("CIFAR100")
def _cifar100(root: PathLike, download: bool, image_size: Optional[int]) -> _Source:
    return _build_cifar(CIFAR100, "CIFAR100", CIFAR100_MEAN, CIFAR100_STD, root, download, image_size)


# --------------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------------
@register_dataset("SVHN")
def _svhn(root: PathLike, download: bool, image_size: Optional[int], use_extra: bool = False) -> _Source:
    """SVHN train ('train' [+ 'extra' when ``use_extra``]) and test ('test'); labels 10 -> 0 (torchvision)."""
    directory = Path(root)
    splits = ["train", "test"] + (["extra"] if use_extra else [])
    names = [SVHN.split_list[s][1] for s in splits]
    how = (f"Pass dataset.download=true, or download {', '.join(names)} from "
           f"http://ufldl.stanford.edu/housenumbers/ into {directory}.")
    if not download:
        _require_files("SVHN", directory, names, how)

    def load(split: str) -> Dataset:
        return _torchvision_call(lambda: SVHN(str(root), split=split, download=download), "SVHN", directory,
                                 how, download)

    train = load("train")
    if use_extra:
        train = ConcatDataset([train, load("extra")])
    test = load("test")
    # No horizontal flip for digits (original code).
    train_tf, test_tf = _small_image_transforms(32, image_size, SVHN_MEAN, SVHN_STD, flip=False, padding=4,
                                                from_pil=True)
    return _Source(train, test, train_tf, test_tf, 10, 3, image_size or 32)


# --------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)
# --------------------------------------------------------------------------------------------------
class BadImageError(FileError):
    """An image file of an image-folder dataset cannot be read (truncated, corrupt, not an image, gone).

    An ``OSError`` (as PIL's errors are) whose message names the image; raised in a DataLoader worker it reaches
    the main process with that message in the worker's traceback."""


def load_image(path: str) -> Any:
    """``ImageFolder``'s loader (torchvision's default: PIL, RGB); an unreadable image raises
    :class:`BadImageError` naming it and saying what to do."""
    try:
        return default_loader(path)
    except OSError as err:  # PIL: "image file is truncated", "Truncated File Read", UnidentifiedImageError, ...
        raise BadImageError(
            f"cannot read image {path} ({describe_os_error(err)}): the file is truncated, corrupt or not an image. "
            f"Remove it from the dataset folder or replace it with a good copy, then re-run",
            errno=err.errno, strerror=err.strerror, filename=path) from err


@register_dataset("ImageNet")
def _imagenet(root: PathLike, download: bool, image_size: Optional[int]) -> _Source:
    """ImageFolder at ``root/train`` and ``root/val`` (one sub-folder per class, the same classes in both).

    train: RandomResizedCrop(s, bilinear) + HFlip; eval: Resize(s*256/224) + CenterCrop(s); s = 224 by default.
    """
    size = image_size or 224
    how = ("ImageNet cannot be downloaded automatically; arrange it as "
           f"{Path(root)}/train/<class>/*.JPEG and {Path(root)}/val/<class>/*.JPEG (the validation images "
           "sorted into class folders, e.g. with the valprep.sh script).")

    def load(split: str) -> Dataset:
        directory = Path(root) / split
        if not directory.is_dir():
            raise DataNotFoundError(f"ImageNet {split} folder not found: expected {directory}. {how}")
        try:
            return ImageFolder(str(directory), loader=load_image)
        except FileNotFoundError as err:  # no class folders, or no image files in them
            raise DataNotFoundError(f"ImageNet {split} folder {directory} holds no usable images ({err}). "
                                    f"{how}") from err

    train, test = load("train"), load("val")
    if train.class_to_idx != test.class_to_idx:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_val = sorted(set(test.classes) - set(train.classes))[:5]
        raise ValueError(f"ImageNet class folders differ between {Path(root) / 'train'} and {Path(root) / 'val'} "
                         f"(only in train: {only_train}, only in val: {only_val}); labels would not match.")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    bilinear = T.InterpolationMode.BILINEAR
    train_tf = T.Compose([T.RandomResizedCrop(size, interpolation=bilinear), T.RandomHorizontalFlip(),
                          T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(_resize_for(size), interpolation=bilinear), T.CenterCrop(size),
                         T.ToTensor(), normalize])
    return _Source(train, test, train_tf, test_tf, len(train.classes), 3, size)


# --------------------------------------------------------------------------------------------------
# FashionMNIST (idx files: torchvision layout or the Debian package)
# --------------------------------------------------------------------------------------------------
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an unsigned-byte idx file (``.gz`` or plain): images -> uint8 ``[N, H, W]``, labels -> ``[N]``.

    Format: 2 zero bytes, type byte 0x08 (ubyte), number of dims ``d``, ``d`` big-endian uint32 sizes, data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(f"{path} is not an unsigned-byte idx file (header {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise ValueError(f"{path} is truncated or corrupt: header says {shape} "
                         f"({math.prod(shape)} bytes) but it holds {len(raw) - offset} data bytes")
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    return torch.from_numpy(data.copy())


def _find_idx_dir(directories: Sequence[Path]) -> Optional[dict[str, Path]]:
    """First directory holding all four FashionMNIST idx files (each plain or ``.gz``)."""
    for directory in directories:
        found = {}
        for key, name in FASHION_MNIST_FILES.items():
            for candidate in (directory / name, directory / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    return None


@register_dataset("FashionMNIST")
def _fashion_mnist(root: PathLike, download: bool, image_size: Optional[int],
                   debian_dir: Optional[PathLike] = DEBIAN_FASHION_MNIST_DIR) -> _Source:
    """FashionMNIST from ``root/FashionMNIST/raw/`` (torchvision layout) or, failing that, ``debian_dir``.

    train: RandomCrop(28, pad 2) + HFlip; normalised with mean 0.2860, std 0.3530. In memory. With
    ``image_size`` (e.g. 14 for CPU benchmarks) the images are resized once at load time (antialiased), then
    augmented the same way at that size (padding scaled).
    """
    raw_dir = Path(root) / "FashionMNIST" / "raw"
    directories = [raw_dir] + ([Path(debian_dir)] if debian_dir else [])
    files = _find_idx_dir(directories)
    if files is None and download:
        how = f"Place the idx files in {raw_dir}."
        _torchvision_call(lambda: FashionMNIST(str(root), train=True, download=True), "FashionMNIST", raw_dir,
                          how, True)
        files = _find_idx_dir([raw_dir])
    if files is None:
        names = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES.values())
        raise DataNotFoundError(
            f"FashionMNIST data not found: expected {names} in {raw_dir}"
            + (f" or in {debian_dir}" if debian_dir else "")
            + ". Install the Debian package (apt-get install dataset-fashion-mnist, files under "
            f"{DEBIAN_FASHION_MNIST_DIR}) or pass dataset.download=true.")
    if files["train_images"].parent != raw_dir:
        log.warning("FashionMNIST: nothing in %s (task.dataset.root); using the idx files in %s instead",
                    raw_dir, files["train_images"].parent)
    else:
        log.info("FashionMNIST: reading idx files from %s", raw_dir)

    def load(split: str) -> TensorImageDataset:
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"FashionMNIST {split} idx files disagree: images {tuple(images.shape)} from "
                             f"{files[f'{split}_images']}, labels {tuple(labels.shape)} from {files[f'{split}_labels']}")
        return TensorImageDataset(images.unsqueeze(1), labels)  # [N, 1, 28, 28] uint8

    train, test = load("train"), load("test")
    native = 28
    if image_size is not None and image_size != native:
        # In memory: resize every image once (area average) instead of per sample and per epoch, then
        # augment at the new size like CIFAR (random crop with proportional padding + flip).
        train, test = (resize_in_memory(d, image_size) for d in (train, test))
        native = image_size
    train_tf, test_tf = _small_image_transforms(native, None, FASHION_MNIST_MEAN, FASHION_MNIST_STD, flip=True,
                                                padding=max(1, round(2 * native / 28)), from_pil=False)
    return _Source(train, test, train_tf, test_tf, 10, 1, native)


def resize_in_memory(dataset: "TensorImageDataset", size: int) -> "TensorImageDataset":
    """The dataset with every image resized to ``size`` x ``size`` once (antialiased bilinear, uint8 kept)."""
    images = dataset.images
    resized = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    if images.dtype == torch.uint8:
        resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return TensorImageDataset(resized, dataset.labels)


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------
@register_dataset("digits")
def _digits(root: PathLike, download: bool, image_size: Optional[int]) -> _Source:
    """1,797 8x8 grey digits bundled with scikit-learn; fixed 1437/360 train/test split (seed 0).

    Pixels 0..16 are scaled to [0, 1] then normalised; train: RandomCrop(8, pad 1). ``root`` is unused.
    """
    # lazily: scikit-learn's import costs about 2 s and only this dataset needs it
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test_idx, train_idx = order[:DIGITS_TEST_SIZE].sort().values, order[DIGITS_TEST_SIZE:].sort().values
    train = TensorImageDataset(images[train_idx], labels[train_idx])
    test = TensorImageDataset(images[test_idx], labels[test_idx])
    train_tf, test_tf = _small_image_transforms(8, image_size, DIGITS_MEAN, DIGITS_STD, flip=False, padding=1,
                                                from_pil=False)
    return _Source(train, test, train_tf, test_tf, 10, 1, image_size or 8)


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------
def make_synthetic(num_samples: int, prototypes: torch.Tensor, noise: float,
                   generator: torch.Generator) -> TensorImageDataset:
    """``num_samples`` images ``prototype[label] + noise * N(0, 1)``, labels balanced and shuffled.

    ``prototypes``: float ``[num_classes, C, H, W]``.
    """
    num_classes = prototypes.shape[0]
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=generator)]
    images = prototypes[labels] + noise * torch.randn((num_samples, *prototypes.shape[1:]), generator=generator)
    return TensorImageDataset(images, labels)


@register_dataset("synthetic")
def _synthetic(root: PathLike, download: bool, image_size: Optional[int], num_classes: int = 10,
               in_channels: int = 3, train_size: int = 512, test_size: int = 256, noise: float = 1.0,
               seed: int = 0) -> _Source:
    """Learnable random data: each class is a smooth random pattern (a 4x4 grid upsampled bilinearly,
    unit std), each sample its class pattern plus Gaussian noise of std ``noise``. Images are already
    roughly zero-mean/unit-std, so no normalisation; train: RandomCrop(pad max(1, s//16)).
    ``image_size`` defaults to 32. Same arguments -> same data.
    """
    size = image_size or 32
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("train_size", train_size),
                       ("test_size", test_size), ("image_size", size)):
        if int(value) < 1:
            raise ValueError(f"synthetic.{key} must be >= 1, got {value}")
    if num_classes < 2:
        raise ValueError(f"synthetic.num_classes must be >= 2, got {num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    coarse = torch.randn((num_classes, in_channels, 4, 4), generator=gen)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) / protos.std(dim=(1, 2, 3), keepdim=True)
    train = make_synthetic(int(train_size), protos, float(noise), gen)
    test = make_synthetic(int(test_size), protos, float(noise), gen)
    train_tf = T.RandomCrop(size, padding=max(1, size // 16))
    return _Source(train, test, train_tf, None, int(num_classes), int(in_channels), size)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _num_val(val_size: Union[int, float], n_train: int, name: str) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be a fraction in (0, 1) or a count, got {val_size!r}")
    if isinstance(val_size, float):
        if val_size == 0:
            return 0
        if not 0 < val_size < 1:
            raise ValueError(f"val_size={val_size} as a float must be a fraction in (0, 1) (or an int count)")
        n_val = int(round(val_size * n_train))
    else:
        n_val = int(val_size)
    if n_val != 0 and not 1 <= n_val < n_train:
        raise ValueError(f"val_size={val_size} gives {n_val} validation images, but the {name} training set "
                         f"holds {n_train}: need 1 <= n_val < {n_train}")
    return n_val


def _subset(indices: Optional[torch.Tensor], train_size: Optional[int], seed: int, name: str):
    """A seeded subset of ``train_size`` of ``indices`` (sorted), or ``indices`` itself when None."""
    if train_size is None:
        return indices
    if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
        raise ValueError(f"train_size must be a positive image count or null, got {train_size!r}")
    if train_size > len(indices):
        raise ValueError(f"train_size={train_size} exceeds the {len(indices)} {name} training images left after the "
                         "validation split")
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(int(seed) + 1))
    return indices[order[:train_size]].sort().values


def split_indices(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint split of ``range(n)`` into sorted ``(train_idx [n - n_val], val_idx [n_val])``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def build_datasets(name: str, root: PathLike, download: bool = False, val_size: Union[int, float] = 0.1,
                   split_seed: int = 0, image_size: Optional[int] = None, synthetic: Optional[dict] = None,
                   train_size: Optional[int] = None, **options: Any) -> DataSplits:
    """Build the train / val / test datasets of ``name`` (see :func:`list_datasets`).

    Args:
        name: registered dataset name (case-insensitive).
        root: data folder handed to torchvision (unused by ``digits`` and ``synthetic``).
        download: let torchvision download missing CIFAR/SVHN/FashionMNIST files.
        val_size: fraction in (0, 1) or absolute count of *training* images held out as validation
            data (eval transforms); 0 means no validation split (``val=None``).
        split_seed: seed of the validation split (same seed -> same split).
        image_size: output side; None keeps the native size (224 for ImageNet). For the 32/28/8-pixel
            datasets a different size uses the Resize(s*256/224) + crop(s) recipe.
        synthetic: options of the ``synthetic`` dataset (num_classes, in_channels, image_size,
            train_size, test_size, noise, seed); ignored for other datasets.
        train_size: keep only this many training images (a seeded subset, from ``split_seed``, of what is
            left after the validation split; None keeps all). For CPU-sized benchmarks; val/test unchanged.
        **options: dataset-specific options, e.g. ``use_extra`` (SVHN), ``debian_dir`` (FashionMNIST).

    Raises:
        DataNotFoundError: the files are missing (or corrupt) and ``download`` is off or failed.
    """
    canonical = _canonical_name(name)
    builder = _REGISTRY[canonical]
    options = dict(options)
    if canonical == "synthetic" and synthetic:
        synthetic = dict(synthetic)
        if "image_size" in synthetic:
            size = synthetic.pop("image_size")
            if image_size is not None and size is not None and int(size) != int(image_size):
                raise ValueError(f"synthetic.image_size={size} contradicts image_size={image_size}")
            image_size = image_size if size is None else int(size)
        options.update(synthetic)
    accepted = list(inspect.signature(builder).parameters)[3:]  # after (root, download, image_size)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset {canonical} does not accept option(s) {unknown}; "
                         f"its options are {accepted or 'none'}")
    source = builder(root, bool(download), None if image_size is None else int(image_size), **options)

    n_val = _num_val(val_size, len(source.train), canonical)
    if n_val == 0:
        indices = None if train_size is None else torch.arange(len(source.train))
        train = TransformedSubset(source.train, _subset(indices, train_size, split_seed, canonical),
                                  source.train_transform)
        val = None
    else:
        train_idx, val_idx = split_indices(len(source.train), n_val, split_seed)
        train = TransformedSubset(source.train, _subset(train_idx, train_size, split_seed, canonical),
                                  source.train_transform)
        val = TransformedSubset(source.train, val_idx, source.eval_transform)
    test = TransformedSubset(source.test, None, source.eval_transform)
    return DataSplits(train=train, val=val, test=test, num_classes=source.num_classes,
                      in_channels=source.in_channels, image_size=source.image_size, name=canonical)


def build_loaders(splits: DataSplits, batch_size: int, eval_batch_size: int, num_workers: int = 0,
                  seed: Optional[int] = None, distributed: bool = False) -> DataLoaders:
    """DataLoaders for ``splits``: shuffled train, unshuffled val/test.

    With ``num_workers > 0`` the train loader's workers are persistent (started once, not every epoch; they keep
    their random streams from epoch to epoch); val/test start theirs per pass, so they hold no processes between
    evaluations.

    With ``seed`` the train order (and the workers' augmentation seeds) come from a seeded
    ``torch.Generator``. With ``num_workers=0`` augmentation draws from the global torch RNG, so seed
    that too (``utils.seed``) for bit-identical batches. With ``distributed=True`` (an initialised
    ``torch.distributed`` group is required) every split gets a ``DistributedSampler`` (train shuffled
    with ``seed`` or 0; val/test padded to a multiple of the world size, as in torchvision's reference
    scripts); call ``loaders.set_epoch(epoch)`` each epoch. Batches: images ``[B, C, H, W]``, labels ``[B]``.
    """
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("build_loaders(distributed=True) needs torch.distributed to be initialised first "
                           "(launch with torchrun and call torch.distributed.init_process_group)")
    common = dict(num_workers=int(num_workers), pin_memory=torch.cuda.is_available(), worker_init_fn=seed_worker)
    generator = None if seed is None else make_generator(seed)

    def make(dataset: Optional[Dataset], batch: int, train: bool) -> Optional[DataLoader]:
        if dataset is None:
            return None
        persistent = train and int(num_workers) > 0
        if distributed:
            sampler = DistributedSampler(dataset, shuffle=train, seed=0 if seed is None else int(seed))
            return DataLoader(dataset, batch_size=batch, sampler=sampler, generator=generator,
                              persistent_workers=persistent, **common)
        return DataLoader(dataset, batch_size=batch, shuffle=train, generator=generator if train else None,
                          persistent_workers=persistent, **common)

    return DataLoaders(train=make(splits.train, batch_size, True), val=make(splits.val, eval_batch_size, False),
                       test=make(splits.test, eval_batch_size, False))
