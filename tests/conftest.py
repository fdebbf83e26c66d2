"""Fixtures shared by the attention, KV-cache, structure and depth tests.

A test file's own fixture of the same name wins.
"""

import pytest

from utils import load_texts, make_dataloader
from utils.models import _tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def loader(tokenizer):
    return make_dataloader(load_texts("wikitext", n=4), tokenizer, batch_size=2, max_length=40)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer(["The history of the city begins with a"], return_tensors="pt")
