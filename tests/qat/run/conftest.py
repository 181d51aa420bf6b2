"""Uninterrupted 2-process TinyLM runs (DDP and FSDP2), made once per test session and shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.qat.run.test_ddp_faults import run_dist


class TinyLMRuns:
    """Runs `dist_script RUN_DIR full trainer.strategy=S` the first time strategy S is asked for."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory, self.dirs = factory, {}

    def __getitem__(self, strategy: str) -> Path:
        if strategy not in self.dirs:
            run_dir = self.factory.mktemp(f"tinylm_{strategy}")
            done = run_dist(run_dir, "full", f"trainer.strategy={strategy}")
            assert done.returncode == 0, done.stderr[-3000:]
            self.dirs[strategy] = run_dir
        return self.dirs[strategy]


@pytest.fixture(scope="session")
def tinylm_runs(tmp_path_factory) -> TinyLMRuns:
    return TinyLMRuns(tmp_path_factory)
