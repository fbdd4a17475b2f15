import pytest

from tests.train.corpus import prepare_small_corpus


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A small byte-tokenized training dataset, shared read-only by the checkpoint tests."""
    return prepare_small_corpus(tmp_path_factory.mktemp("ckpt-data"))
