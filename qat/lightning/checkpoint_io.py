"""Checkpoints written atomically: a full disk or an unwritable run directory is a clear
error, and the checkpoint already at the path stays intact.

Lightning's own writer opens the destination for writing and streams into it, so a
write that fails half way (ENOSPC) leaves a truncated `last.ckpt` behind: the run that
needs to resume has nothing to resume from. Here the checkpoint goes to a temporary file
in the same directory (same file system, so the rename is atomic), is flushed and
fsync'ed, and only then replaces the destination with `os.replace`; the directory is
fsync'ed so the rename itself survives a power cut. On any failure the temporary file is
removed and `CheckpointWriteError` says what failed and that the previous file is kept.

A full disk does not always arrive as an OSError: torch.save's zip writer checks how far
each write got and reports a short write as a RuntimeError ("unexpected pos N vs M", or
"PytorchStreamWriter failed writing file"); those are write failures too.

Because a write never leaves a truncated file, a resumed run can keep overwriting `last.ckpt`:
`RunCheckpoint` is Lightning's ModelCheckpoint without `-v1` copies (which made the next
`resume=last` pick a stale file), and `saved_step` reads the global step a checkpoint records,
how `resume=last` tells which of its files is the newest.

Example:
    >>> pl.Trainer(plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from qat.config import ConfigError


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the file previously at its path is untouched."""


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free in {directory}"
    except OSError:
        return f"free space in {directory} unknown"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` that either fully replaces `path` or leaves it as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; a checkpoint gets the usual mode
    except OSError as err:
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {err.strerror or err} (is the run directory writable?)"
        ) from err
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and not any(text in str(err) for text in _WRITER_FAILURES):
            raise  # not a write failure (e.g. an object torch cannot serialize)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else f"the write stopped short ({err})"
        kept = "the previous checkpoint there is intact" if path.exists() else "no checkpoint was there before"
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {reason} (disk full or quota exceeded? {_free_space(path.parent)}); "
            f"{kept}"
        ) from err
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with atomic, durable local writes (see the module notes)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        if "://" in str(path):  # remote (fsspec) paths: Lightning's own writer
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def saved_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint records (memory-mapped: its tensors are not read); a
    `ConfigError` naming the file when it is not a readable training checkpoint."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as err:  # pickle, zip, torch and key errors alike
        raise ConfigError(f"cannot resume from {path}: not a readable training checkpoint "
                          f"({type(err).__name__}: {err})") from None


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for a run directory: a file is overwritten in place (atomically, by
    AtomicCheckpointIO), never written beside as `last-v1.ckpt`; on resume Lightning's warning that the
    checkpoint directory is not empty (expected then) is left out, and a run directory that was copied
    or moved keeps its best score and paths (Lightning drops them when the recorded dirpath differs, so
    the first validation after resume would overwrite a better best.ckpt)."""

    def __init__(self, *args: Any, resuming: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=False, **kwargs)
        self.resuming = resuming

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.resuming:
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # a run that stops before its first validation (max_steps inside the first epoch) has nothing to rank:
        # Lightning saves nothing then either, but warns with every logged key
        if (self.monitor is not None and self.monitor not in monitor_candidates
                and not trainer.fit_loop.epoch_loop.val_loop._has_run):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir is not None and self.dirpath is not None and Path(saved_dir) != Path(self.dirpath):
            state_dict = _relocated(state_dict, Path(saved_dir), Path(self.dirpath))
        super().load_state_dict(state_dict)


def _relocated(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """ModelCheckpoint's state with the paths of files in `old` moved to `new` (the copied run's)."""

    def move(path: Any) -> Any:
        return str(new / Path(path).name) if path and Path(path).parent == old else path

    state = {**state, "dirpath": str(new)}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {move(path): score for path, score in state["best_k_models"].items()}
    return state
