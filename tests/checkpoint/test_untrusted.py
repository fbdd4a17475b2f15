"""A checkpoint is data, never code: a DCP index entry that is a pickled object (DCP's "bytes" entry,
which torch would load with weights_only=False) is refused by every reader — resume, inference,
export — before anything is unpickled."""

import io
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.infer.helpers import infer_spec, prepare_prompts, run_cli


class Payload:
    """Pickles as a call of eval: unpickling it creates `marker` and yields a real 0-d tensor, so a
    resume that unpickled it would even finish with exit 0."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch() or __import__('torch').zeros(())",)


def poison(ckpt: Path, entry: str, marker: Path) -> None:
    """Rewrite `entry` of the checkpoint's DCP index as a bytes entry holding Payload, as an attacker
    who can write the run dir would."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    dcp = ckpt / "dcp"
    md = pickle.loads((dcp / ".metadata").read_bytes())  # hpcllm's own index, in the test: trusted
    assert entry in md.state_dict_metadata
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    (dcp / "__9_0.distcp").write_bytes(buf.getvalue())
    md.state_dict_metadata[entry] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != entry}
    md.storage_data[MetadataIndex(entry)] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()))
    (dcp / ".metadata").write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("untrusted")
    ds = small_dataset
    spec = root / "train.yaml"
    spec.write_text(json.dumps({
        "kind": "train", "name": "u", "run_dir": str(root / "run"), "data": {"dataset": str(ds)},
        "model": {"size": "custom", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
        "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "eval_interval": 0, "log_interval": 1,
                  "progress": False}}))
    p = run_cli("train", spec)
    assert p.returncode == 0, p.stderr[-3000:]
    assert prepare_prompts(root, [{"id": i, "prompt": f"def f{i}("} for i in range(2)]).returncode == 0
    return root, spec


def test_hpcllm_writes_only_tensor_entries(trained):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from hpcllm.checkpoint.sharded import read_dcp_metadata

    root, _ = trained
    md = read_dcp_metadata(root / "run" / "checkpoints" / "step_00000002" / "dcp")
    assert md.state_dict_metadata and all(isinstance(m, TensorStorageMetadata) for m in md.state_dict_metadata.values())
    assert any(k.endswith(".step") for k in md.state_dict_metadata)  # AdamW's step: a 0-d tensor, not a value


def test_a_pickled_entry_is_refused_by_resume_infer_and_export_before_it_runs(trained, tmp_path):
    import shutil

    root, spec = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    ckpt = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "PWNED"
    entry = next(k for k in pickle.loads((ckpt / "dcp" / ".metadata").read_bytes()).state_dict_metadata
                 if k.startswith("optim.") and k.endswith(".step"))
    poison(ckpt, entry, marker)
    commands = {
        "train": ["train", spec, f"run_dir={run}", "train.max_steps=3"],
        "infer": ["infer", infer_spec(tmp_path, "inf", model=run, prompts=root / "prompts")],
        "export": ["export", run, tmp_path / "hf"],
    }
    with ThreadPoolExecutor(3) as pool:  # three processes at once: each spends most of its time importing torch
        runs = dict(zip(commands, pool.map(lambda args: run_cli(*args), commands.values())))
    for cmd, p in runs.items():
        assert not marker.exists(), f"hpcllm {cmd} unpickled the payload"
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 6, (cmd, p.stderr[-3000:])
        assert "Traceback" not in p.stderr, (cmd, p.stderr[-3000:])
        err = [ln for ln in lines if f"hpcllm {cmd}: error:" in ln]
        assert len(err) == 1 and f"{ckpt / 'dcp' / '.metadata'}: entry '{entry}' is a pickled object" in err[0], \
            (cmd, p.stderr[-3000:])
    assert not (tmp_path / "hf").exists()


def test_the_load_planner_never_unpickles_a_bytes_entry_either(tmp_path):
    """Behind the index check, a second guard: DCP's planner with its unsafe load_bytes replaced, for
    a DCP that found another way to plan a bytes read."""
    import torch.distributed.checkpoint as dcp

    from hpcllm.checkpoint.sharded import _planner

    marker = tmp_path / "PWNED"
    dcp.save({"x": Payload(marker)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "dcp")), no_dist=True)
    state = {"x": torch.ones(())}
    with pytest.raises(BaseException, match="'x' is a pickled object, not a tensor"):  # DCP's CheckpointException
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(tmp_path / "dcp")), planner=_planner(), no_dist=True)
    assert not marker.exists() and torch.equal(state["x"], torch.ones(()))
