"""report_loader: the test split where a data module has one, else its validation split."""

from __future__ import annotations

import pytorch_lightning as pl

from qat.data import DigitsDataModule
from qat.data.loading import report_loader


class WithTest(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.stages: list = []

    def setup(self, stage=None) -> None:
        self.stages.append(stage)

    def val_dataloader(self):
        return ["validation batch"]

    def test_dataloader(self):
        return ["test batch"]


def test_the_report_measures_on_the_test_split_only_where_one_is_defined():
    data = WithTest()
    assert report_loader(data) == ("test", ["test batch"]) and data.stages == ["test"]
    digits = DigitsDataModule()  # LightningDataModule's default test_dataloader raises: not a test split
    digits.setup("fit")
    split, loader = report_loader(digits)
    assert split == "validation" and len(loader.dataset) == len(digits.val_set)
