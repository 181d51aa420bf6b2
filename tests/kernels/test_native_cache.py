"""The compiled module's build cache: one folder per source version, stale ones deleted."""

import os
import time

from qat.kernels.native import STALE_DAYS, build_directory, prune_stale_builds, source_digest


def _folder(base, name, age_days):
    folder = base / name
    folder.mkdir()
    (folder / "module.so").write_bytes(b"x")
    stamp = time.time() - age_days * 86400
    os.utime(folder, (stamp, stamp))
    return folder


def test_prune_deletes_only_stale_siblings(tmp_path):
    current = _folder(tmp_path, "current", STALE_DAYS + 30)  # its own folder is never deleted, however old
    stale = _folder(tmp_path, "stale", STALE_DAYS + 1)
    fresh = _folder(tmp_path, "fresh", STALE_DAYS - 1)
    (tmp_path / "a-file").write_text("not a build folder")
    assert prune_stale_builds(current) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "current", "fresh"]
    assert (fresh / "module.so").exists() and (current / "module.so").exists()


def test_prune_without_a_cache_folder_is_a_no_op(tmp_path):
    assert prune_stale_builds(tmp_path / "missing" / "digest") == []


def test_build_folder_follows_sources_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_NATIVE_BUILD_DIR", str(tmp_path))
    assert build_directory(["-O3"]) == tmp_path / source_digest(["-O3"])
    assert build_directory(["-O3"]) != build_directory(["-O3", "-mavx512f"])
