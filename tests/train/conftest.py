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


@pytest.fixture(scope="module")
def shared_run(dataset, tmp_path_factory):
    """`run(name, model, n, overrides, **spec)`: tests/train/test_sharded.py's `train` of that spec on n
    ranks, once per module: a test that needs a run another test of its module already made (the same
    plan, model and batch) reads it, or copies it to resume, instead of launching it again. Returns
    (run_dir, spec_path, CompletedProcess). A name asked for twice must be the same run."""
    from tests.train.test_sharded import spec_file, train

    root = tmp_path_factory.mktemp("shared")
    done = {}

    def run(name, model, n, overrides=(), **spec):
        key = (repr(model), n, tuple(overrides), repr(sorted(spec.items())))
        if name not in done:
            path = spec_file(root, dataset, name, model, **spec)
            done[name] = (key, path, train(path, n, *overrides))
        assert done[name][0] == key, (name, "is another run", done[name][0], key)
        return root / name, done[name][1], done[name][2]

    return run
