"""Faults a long run meets, each reproduced and shown fixed: atomic checkpoints on a full disk or an
unwritable directory, CUDA RNG states in checkpoints, import errors that must not hide CLI commands."""

from __future__ import annotations

import builtins
import errno
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import qat.lightning.checkpoint_io as checkpoint_io
import qat.lightning.rng as rng
from qat.cli import build_parser, main, optional_import_missing
from qat.lightning.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from qat.lightning.rng import RNGStateWarning, collect_rng_states, restore_rng_states

# ---- atomic checkpoint writes ---------------------------------------------------------------------


def _previous_checkpoint(directory: Path) -> tuple[Path, bytes]:
    path = directory / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    return path, path.read_bytes()


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path, _ = _previous_checkpoint(tmp_path)
    AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.ones(3)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_disk_full_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path, before = _previous_checkpoint(tmp_path)
    real_save = torch.save

    def save_until_disk_full(obj, file, *args, **kwargs):
        file.write(b"partial bytes of a checkpoint")  # the write got this far, then the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_disk_full)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt.*No space left.*previous checkpoint .*intact"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert path.read_bytes() == before  # byte for byte the checkpoint of step 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone


def test_a_short_write_reported_by_torchs_zip_writer_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    """On a full disk torch.save raises RuntimeError, not OSError: its zip writer checks the file position
    after each write (text below as torch 2.13 prints it on a 1 MiB tmpfs)."""
    path, before = _previous_checkpoint(tmp_path)

    def save_until_short_write(obj, file, *args, **kwargs):
        file.write(b"partial bytes of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1002747904 vs 1002747792")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_until_short_write)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: the write stopped short .*unexpected pos.*"
                                                    r"disk full.*MiB free in .*previous checkpoint .*intact"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_runtime_errors_of_torch_save_pass_through_and_leave_no_temporary(tmp_path, monkeypatch):
    def save_fails(obj, file, *args, **kwargs):
        raise RuntimeError("cannot pickle this object")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_fails)
    with pytest.raises(RuntimeError, match="cannot pickle this object") as caught:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "last.ckpt")
    assert not isinstance(caught.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that lets this process mount; skipped elsewhere)."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_real_full_disk_keeps_the_previous_checkpoint(tiny_disk):
    path, before = _previous_checkpoint(tiny_disk)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: .*disk full.*previous checkpoint .*intact"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(2**19)}, path)  # 2 MiB > the disk
    assert path.read_bytes() == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last.ckpt"]


def test_lightnings_own_writer_truncates_the_previous_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    """The fault the atomic writer fixes. Lightning's TorchCheckpointIO writes into a temporary file in
    the system temp dir, then `shutil.move`s it over the checkpoint; with the run directory on another
    disk (a tmpfs /tmp, a mounted volume) the move is a copy into the opened, truncated destination, and
    a disk that fills up during that copy leaves a broken checkpoint where the good one was."""
    import shutil

    from pytorch_lightning.plugins.io import TorchCheckpointIO

    path, before = _previous_checkpoint(tmp_path)
    real_rename = os.rename

    def rename_across_devices(src, dst, *args, **kwargs):
        if str(dst) == str(path):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst, *args, **kwargs)

    def copy_until_disk_full(src, dst, *args, **kwargs):
        with open(dst, "wb") as out:
            out.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "rename", rename_across_devices)
    monkeypatch.setattr(shutil, "copyfile", copy_until_disk_full)
    with pytest.raises(OSError, match="No space left"):
        TorchCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"partial" != before  # the only checkpoint of the run is gone


def test_atomic_writer_never_copies_across_devices(tmp_path, monkeypatch):
    """Same scenario for the fix: its temporary file sits next to the checkpoint, so the rename
    never crosses a device and the copy that could fill the disk never happens."""
    import shutil

    path, _ = _previous_checkpoint(tmp_path)

    def no_copy(*args, **kwargs):
        raise AssertionError("the atomic writer copied a file")

    monkeypatch.setattr(shutil, "copyfile", no_copy)
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")  # unwritable even for root
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*run/checkpoints/last\.ckpt.*writable"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, blocker / "checkpoints" / "last.ckpt")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory_keeps_the_previous_checkpoint(tmp_path):
    path, before = _previous_checkpoint(tmp_path)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match=r"Permission denied"):
            AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    finally:
        tmp_path.chmod(0o755)
    assert path.read_bytes() == before


def test_read_only_directory_mocked_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The read-only case for every user (root ignores the mode bits): the temporary file cannot be made."""
    path, before = _previous_checkpoint(tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoint_io.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match=r"Permission denied.*writable"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before


# ---- the run directory is checked writable before any work ---------------------------------------


def _train_argv(runs: Path, *extra: str) -> list[str]:
    from tests.qat.run.helpers import DEFAULT_RECIPE, FAST

    return ["train", str(DEFAULT_RECIPE), *FAST, f"logging.run_dir={runs}", *extra]


def _no_model_is_built(monkeypatch) -> None:
    import qat.run.build

    def fail(*args, **kwargs):
        raise AssertionError("the model was built before the run directory was checked")

    monkeypatch.setattr(qat.run.build, "build_model", fail)


def test_a_file_in_place_of_the_runs_folder_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")  # unwritable for root too
    _no_model_is_built(monkeypatch)
    assert main(_train_argv(blocker)) == 2
    assert capsys.readouterr().err == (f"qat: error: run directory {blocker}/digits_w4a4/version_0 is not "
                                       f"writable (in {blocker}): not a directory\n")
    assert blocker.read_text() == "a file where the runs folder should be"


def test_a_read_only_run_directory_is_refused_on_resume_with_nothing_written(tmp_path, monkeypatch, capsys):
    """A read-only mount, mocked where qat probes it (root ignores permission bits): the probe file
    cannot be made in the run directory, and resume=last stops before anything is loaded or written."""
    from qat.run.train import train
    from tests.qat.run.helpers import fast_recipe

    train(fast_recipe(tmp_path, "trainer.max_steps=12"), quiet=True)
    run_dir = tmp_path / "digits_w4a4" / "version_0"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    real_mkstemp = tempfile.mkstemp

    def read_only_mount(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(run_dir):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mount)
    _no_model_is_built(monkeypatch)
    assert main(_train_argv(tmp_path, "trainer.max_steps=20", "resume=last")) == 2
    assert capsys.readouterr().err == f"qat: error: run directory {run_dir} is not writable: Read-only file system\n"
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ---- RNG states --------------------------------------------------------------------------------


def test_cpu_rng_states_come_back_exactly():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    states = collect_rng_states()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_states(states)
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]


class FakeCuda:
    """Stands in for torch.cuda on a machine without a GPU: two devices, states as byte tensors."""

    def __init__(self, devices: int):
        self.devices = devices
        self.states = [torch.full((8,), i, dtype=torch.uint8) for i in range(devices)]

    def is_available(self):
        return True

    def device_count(self):
        return self.devices

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.states = [s.clone() for s in states]


def test_cuda_rng_states_are_saved_and_restored(monkeypatch):
    cuda = FakeCuda(devices=2)
    monkeypatch.setattr(rng.torch, "cuda", cuda)
    states = collect_rng_states()
    assert [s.tolist() for s in states["cuda"]] == [[0] * 8, [1] * 8]
    cuda.states = [torch.zeros(8, dtype=torch.uint8)] * 2  # the run drew more numbers
    restore_rng_states(states)
    assert [s.tolist() for s in cuda.states] == [[0] * 8, [1] * 8]


def test_cuda_rng_states_for_other_devices_are_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(rng.torch, "cuda", FakeCuda(devices=2))
    states = collect_rng_states()
    here = FakeCuda(devices=1)
    monkeypatch.setattr(rng.torch, "cuda", here)
    torch.rand(3)  # the CPU generator moves on
    with pytest.warns(RNGStateWarning, match=r"CUDA RNG states for 2 device\(s\) but 1 are visible"):
        restore_rng_states(states)
    assert [s.tolist() for s in here.states] == [[0] * 8]  # untouched
    assert torch.equal(torch.get_rng_state(), states["torch"])  # the CPU states are still restored


def test_checkpoint_of_a_qat_module_carries_the_cuda_states(monkeypatch):
    from qat.lightning.module import QATModule

    monkeypatch.setattr(rng.torch, "cuda", FakeCuda(devices=1))
    module = QATModule(torch.nn.Linear(2, 2), task="classification", num_classes=2)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert torch.equal(checkpoint["qat"]["rng"]["cuda"][0], torch.zeros(8, dtype=torch.uint8))
    torch.cuda.states = [torch.ones(8, dtype=torch.uint8)]
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(rng.torch.cuda.states[0], torch.zeros(8, dtype=torch.uint8))


# ---- CLI import errors --------------------------------------------------------------------------


def _import_failing(monkeypatch, error: ImportError) -> None:
    """Fail the `from qat.run.export import ...` that `qat export` runs (the parser imports no command)."""
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "qat.run.export":
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)


EXPORT = ["export", "run", "-o", "model.safetensors"]


def test_a_broken_qat_module_surfaces_when_export_runs(monkeypatch):
    _import_failing(monkeypatch, ImportError("cannot import name 'pack' from 'qat.export.pack'"))
    with pytest.raises(ImportError, match="cannot import name 'pack'"):
        main(EXPORT)


def test_a_missing_qat_submodule_surfaces_too(monkeypatch):
    _import_failing(monkeypatch, ModuleNotFoundError("No module named 'qat.export.gone'", name="qat.export.gone"))
    with pytest.raises(ModuleNotFoundError, match=r"qat\.export\.gone"):
        main(EXPORT)


def test_a_missing_optional_dependency_stops_export_with_an_install_hint(monkeypatch):
    _import_failing(monkeypatch, ModuleNotFoundError("No module named 'safetensors'", name="safetensors"))
    with pytest.raises(SystemExit, match=r"`export` is unavailable.*pip install safetensors"):
        main(EXPORT)
    parser = build_parser()  # the other commands, and export's help, are there all the same
    assert parser.parse_args(["train"]).command == "train"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["export", "--help"])
    assert exit_info.value.code == 0


def test_optional_import_missing_names_the_package_only_for_optional_dependencies():
    assert optional_import_missing(ModuleNotFoundError("x", name="safetensors.torch")) == "safetensors"
    assert optional_import_missing(ModuleNotFoundError("x", name="qat.export.save")) is None
    assert optional_import_missing(ImportError("cannot import name 'x'")) is None


def test_export_and_inspect_exist_when_everything_imports():
    parser = build_parser()
    for command in ("export", "inspect"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


# ---- wiring ---------------------------------------------------------------------------------------


def test_a_built_run_writes_checkpoints_atomically(tmp_path):
    from qat.run.build import build
    from tests.qat.run.helpers import fast_recipe

    run = build(fast_recipe(tmp_path))
    assert isinstance(run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_process_group_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from qat.config import ConfigError
    from qat.lightning.distributed import process_group_timeout

    monkeypatch.delenv("QAT_DIST_TIMEOUT_S", raising=False)
    assert process_group_timeout() == timedelta(seconds=600)
    monkeypatch.setenv("QAT_DIST_TIMEOUT_S", "45")
    assert process_group_timeout() == timedelta(seconds=45)
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("QAT_DIST_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="QAT_DIST_TIMEOUT_S"):
            process_group_timeout()
