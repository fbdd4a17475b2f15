"""Finding inputs: the key that decides a document's train/val split identifies the document."""

from hpcllm.data.config import DataConfig
from hpcllm.data.inputs import find_inputs, glob_base
from hpcllm.data.prepare import split_of


def test_glob_keys_are_relative_to_the_glob_root():
    assert glob_base("/usr/share/doc/*/copyright") == "/usr/share/doc"
    assert glob_base("/data/x/*.txt") == "/data/x"
    assert glob_base("/data/x/a.txt") == "/data/x"
    assert glob_base("/data/**/y/*.txt") == "/data"


def test_files_that_share_a_name_are_split_like_distinct_documents(tmp_path):
    # /usr/share/doc/*/copyright: 200 files with one name. Keyed by basename, every one of them
    # hashed to the same side (val got 1 of 797 documents); keyed by their path under the glob
    # root they split like any other documents
    for i in range(200):
        d = tmp_path / f"pkg{i:03d}"
        d.mkdir()
        (d / "copyright").write_text(f"package {i}\n")
    files = find_inputs(DataConfig(inputs=[str(tmp_path / "*" / "copyright")]))
    assert len(files) == 200 and len({f.key for f in files}) == 200
    assert files[0].key == "pkg000/copyright"
    val = sum(split_of(f.key, 0, 0, 0.25) == "val" for f in files)
    assert 25 <= val <= 75, val  # ~50 expected
    # a plain glob in one directory keeps the file name as before (existing datasets split the same)
    assert find_inputs(DataConfig(inputs=[str(tmp_path / "pkg00*" / "copyright")]))[0].key == "pkg000/copyright"
    assert find_inputs(DataConfig(inputs=[str(tmp_path / "pkg001" / "*")]))[0].key == "copyright"
