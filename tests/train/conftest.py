"""What the sharded and tensor-parallel tests share: one dataset, and the single-rank runs with the
union batch that every plan must equal (read-only: a test that resumes one copies it first)."""

import pytest

from tests.train.corpus import prepare_python_corpus


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return prepare_python_corpus(tmp_path_factory.mktemp("parallel"), val_fraction=0.1)


@pytest.fixture(scope="session")
def references(dataset, tmp_path_factory):
    """One rank with the union batch, for each model (tests/train/test_sharded.py's LLAMA and GPT)."""
    from tests.train.test_sharded import GPT, LLAMA, spec_file, train

    root = tmp_path_factory.mktemp("refs")
    for name, model in (("llama", LLAMA), ("gpt", GPT)):
        train(spec_file(root, dataset, name, model, backend="single"), 1)
    return root
