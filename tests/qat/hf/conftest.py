from __future__ import annotations

import pytest

from tests.qat.hf.tiny_models import save_tiny_bert, save_tiny_llama


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
