"""Training checkpoints that every rank writes its own part of, and that load on any number of ranks.

    run_dir/checkpoints/step_NNNNNNNN/
        dcp/            torch.distributed.checkpoint: model and optimizer state by parameter name,
                        each rank's part in its own __R_0.distcp file, the global index in .metadata
        state.pt        step, loader position, log window, world size, global batch (rank 0)
        rng/rank_R.pt   rank R's RNG state (dropout) — restored when the world size is the same
        meta.json       step, time, world size, sharding mode, model config, the resolved job spec

The ranks write into `step_N.tmp/` together; rank 0 renames it once every rank's files and the
.metadata are on disk (hpcllm.atomic.shared_atomic_dir), so a step directory is complete by
construction. One that is not (copied in part, a filesystem without atomic renames) is skipped with
a warning for the previous complete step; a missing rank file or a tensor of another shape is an
error naming the file — never a partial load.

DCP's .metadata is a pickle: it is read through an unpickler that admits only DCP's own metadata
classes, torch sizes and dtypes; tensors are read by DCP with torch.load(weights_only=True). An index
may name only tensors: DCP stores any other value as a pickle ("bytes" entry) and loads it with
torch.load(weights_only=False) — code, on resume — so a checkpoint with such an entry is refused
(hpcllm writes none: its state dicts hold tensors only, plain values go to state.pt and meta.json).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pickle
import shutil
import time
import warnings
from pathlib import Path

import torch

from hpcllm.atomic import TMP_SUFFIX, replace_dir, shared_atomic_dir
from hpcllm.checkpoint.layout import DCP_DIR, METADATA
from hpcllm.errors import CheckpointError, HpcllmError

log = logging.getLogger("hpcllm.checkpoint")
# DCP says so for every save of a one-rank job; an async save says it in its own thread, where
# warnings.catch_warnings (not thread-safe) cannot silence it
warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")

# BytesStorageMetadata is admitted only so that read_dcp_metadata can name the entry that holds one
# when it refuses it, rather than say "not part of a checkpoint index"
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"BytesStorageMetadata", "ChunkStorageMetadata", "Metadata",
                                              "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def read_dcp_metadata(dcp_dir: Path):
    """The DCP index of a checkpoint, or a one-line CheckpointError naming the file. Every path that
    reads a checkpoint's dcp/ (resume, inference, export) comes through here first."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    f = dcp_dir / METADATA
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        with open(f, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{f}: not a trusted checkpoint index ({e}); hpcllm never unpickles anything else") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint index ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{f}: not a checkpoint index")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):  # a bytes entry: a pickle DCP would load unsafely
            raise CheckpointError(f"{f}: entry '{key}' is a pickled object, not a tensor; hpcllm never unpickles "
                                  "one (it would run code) and never writes one: was this checkpoint written by "
                                  "hpcllm?")
    return md


def _reader(dcp_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_dcp_metadata(Path(self.path))
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(dcp_dir))


def _planner():
    """DCP's default load planner without its one unsafe step: a bytes entry is torch.load-ed with
    weights_only=False. read_dcp_metadata refuses an index with one already; this keeps it so should
    a DCP version find another way to plan a bytes read."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise CheckpointError(f"entry '{read_item.dest_index.fqn}' is a pickled object, not a tensor; hpcllm "
                                  "never unpickles one")

    return TensorsOnlyPlanner()


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """DCP's names for a nested state dict: keys joined with '.'."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_fits(ckpt: Path, template: dict, md=None) -> None:
    """Every tensor the run needs is in the checkpoint with its shape, and every rank file the index
    (`md`, read here if not given) names is there: otherwise one line naming the file and the tensor."""
    dcp_dir = ckpt / DCP_DIR
    md = md if md is not None else read_dcp_metadata(dcp_dir)
    have = md.state_dict_metadata
    for key, t in flatten(template).items():
        if key not in have:
            raise CheckpointError(f"{dcp_dir / METADATA}: no tensor '{key}' — the checkpoint is of another model "
                                  "(was model.* changed since it was written?). Use a new run_dir or train.resume=false")
        size = tuple(getattr(have[key], "size", ()))
        if torch.is_tensor(t) and size != tuple(t.shape):
            raise CheckpointError(f"{dcp_dir / METADATA}: tensor '{key}' is {size} in the checkpoint but "
                                  f"{tuple(t.shape)} in this model — was model.* (n_embd, n_layer, block_size, "
                                  "vocab) changed since it was written? Use a new run_dir or train.resume=false")
    files = sorted({info.relative_path for info in (md.storage_data or {}).values()})
    for name in files:
        if not (dcp_dir / name).is_file():
            raise CheckpointError(f"{dcp_dir / name}: missing — one rank's part of step {ckpt.name} is gone, so the "
                                  f"checkpoint cannot be loaded (its index lists {len(files)} files)")


def save_sharded(final: Path, comm, state: dict, global_state: dict, meta: dict) -> None:
    """Write one checkpoint directory together with every rank (a collective)."""
    import torch.distributed.checkpoint as dcp

    _process_group(comm)
    barrier = _save_barrier(comm, final)
    with shared_atomic_dir(final, comm.rank == 0, barrier) as tmp:
        _side_files(tmp, comm, global_state, meta, barrier)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
            try:
                dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR), thread_count=1),
                         no_dist=comm.size == 1)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # CheckpointException (a BaseException): one line, not every rank's traceback
                raise CheckpointError(f"{final}: cannot be written ({_why(e)}); the previous checkpoint is kept") from None


def _side_files(tmp: Path, comm, global_state: dict, meta: dict, barrier) -> None:
    """The directories, this rank's RNG state and (rank 0) state.pt and meta.json."""
    if comm.rank == 0:
        (tmp / DCP_DIR).mkdir()
        (tmp / "rng").mkdir()
    barrier()
    torch.save(rank_rng_state(), tmp / "rng" / f"rank_{comm.rank:05d}.pt")
    if comm.rank == 0:
        torch.save(global_state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": global_state["step"], "time": time.time(), **meta},
                                                  indent=2, default=str))


class BackgroundSave:
    """A checkpoint being written by DCP's async save (`start_background_save`). Its directory is
    `final.tmp` until `finish`, on rank 0, renames it — which it does only once DCP's save has
    returned there: DCP's coordinator (rank 0) gathers every rank's write results before it writes
    the index, so by then every rank's part is on disk (and the side files, written before any rank
    joined the save's first collective)."""

    def __init__(self, final: Path, tmp: Path, future, leader: bool, step: int, then):
        self.final, self.tmp, self.future, self.leader, self.step, self._then = final, tmp, future, leader, step, then
        self.started = time.perf_counter()
        self.stalled_s = 0.0

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        concurrent.futures.wait([self.future])

    def finish(self) -> Path:
        """The checkpoint made visible (rank 0) once written; a failed write is a one-line
        CheckpointError and leaves only the .tmp directory."""
        try:
            self.future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise CheckpointError(f"{self.final}: cannot be written in the background ({_why(e)}); the previous "
                                  "checkpoint is kept") from None
        if self.leader:
            replace_dir(self.tmp, self.final)
            self._then()
        return self.final

    def abandon(self) -> None:
        """Leave the write to end on its own; its directory is never renamed."""
        self.future.cancel()


_async_groups: dict[int, object] = {}
_stagers: list = []


def _stager():
    """The one stager of this process: it copies the state into host buffers it keeps from one save
    to the next (by storage), so only the first save pays for allocating them (measured: 1.2 GB
    staged in 2.2 s the first time, 0.3 s after) — at the price of a host copy of the state held
    for the whole run. Pinned where there is a GPU, for fast device-to-host copies."""
    if not _stagers:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        _stagers.append(DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                     use_shared_memory=False, use_async_staging=False,
                                                     use_non_blocking_copy=False)))
    return _stagers[0]


def start_background_save(final: Path, comm, state: dict, global_state: dict, meta: dict, then) -> BackgroundSave:
    """Copy `state` to host memory and write it in a background thread (a collective to start; the
    rest runs beside training). `then` runs on rank 0 once the checkpoint is visible."""
    import torch.distributed.checkpoint as dcp

    group = None
    if comm.size > 1:
        _process_group(comm)
        if comm.size not in _async_groups:  # collective: every rank reaches its first save together
            # a group of its own: the save's collectives run in DCP's thread, and on the training's
            # group they could interleave differently with the training's own on different ranks
            _async_groups[comm.size] = torch.distributed.new_group(backend="gloo")
        group = _async_groups[comm.size]
    barrier = _save_barrier(comm, final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _side_files(tmp, comm, global_state, meta, barrier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # staged: every tensor is copied to host memory before this returns, so the optimizer steps
            # that follow never change what is being written
            future = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR), thread_count=1),
                                    process_group=group, no_dist=comm.size == 1, async_stager=_stager())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise CheckpointError(f"{final}: cannot be written ({_why(e)}); the previous checkpoint is kept") from None
    return BackgroundSave(final, tmp, future, comm.rank == 0, global_state["step"], then)


def _save_barrier(comm, final: Path):
    """comm.barrier for the steps of a save: a peer that died there (gloo and NCCL raise at once) ends
    this rank with one line, exit 6, as a failure inside dcp.save does — not a backend traceback."""

    def barrier() -> None:
        try:
            comm.barrier()
        except (KeyboardInterrupt, SystemExit, HpcllmError):
            raise
        except Exception as e:
            if final.is_dir() and not final.with_name(final.name + TMP_SUFFIX).exists():  # renamed: the last barrier
                raise CheckpointError(f"{final}: written, but a peer rank failed at its end ({_why(e)})") from None
            raise CheckpointError(f"{final}: cannot be written: a peer rank failed ({_why(e)}); the previous "
                                  "checkpoint is kept") from None

    return barrier


def load_sharded(ckpt: Path, comm, state: dict) -> None:
    """Load a checkpoint's model and optimizer into `state` (a plan's state_dict(), any layout), in place."""
    import torch.distributed.checkpoint as dcp

    check_fits(ckpt, state)
    _process_group(comm)
    try:
        dcp.load(state, storage_reader=_reader(ckpt / DCP_DIR), planner=_planner(), no_dist=comm.size == 1)
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as e:  # DCP's CheckpointException (a BaseException) wraps every rank's failure
        raise CheckpointError(f"{ckpt / DCP_DIR}: cannot be loaded ({_why(e)})") from None


def _why(e: BaseException) -> str:
    """One line for a failed DCP load: the first rank's own error, without torch's advice (a hint to
    load with weights_only=False is never passed on)."""
    failures = getattr(e, "failures", None)
    if failures:
        rank, inner = sorted(failures.items())[0]
        e = inner[0] if isinstance(inner, tuple) else inner
    text = str(e).strip().splitlines()
    first = text[0][:300] if text else ""
    if isinstance(e, pickle.UnpicklingError):
        first = "a part is damaged: not a tensor file"
    return f"{type(e).__name__}: {first}"


def _process_group(comm) -> None:
    """DCP coordinates the ranks' parts over torch.distributed (one rank writes without it)."""
    if comm.size > 1:
        from hpcllm.comm.torch_group import ensure_process_group

        ensure_process_group(comm)


def rank_rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rank_rng(ckpt: Path, rank: int) -> bool:
    """This rank's RNG as it was saved; False when the checkpoint has no file for this rank."""
    from hpcllm.checkpoint.files import read_state_file

    f = ckpt / "rng" / f"rank_{rank:05d}.pt"
    if not f.is_file():
        return False
    st = read_state_file(f)
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    return True


def read_model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint, consolidated from every rank's part, in one process (export,
    inference, tests): {parameter name: tensor}."""
    template = _model_template(ckpt)
    tree = {"model": {k[len("model."):]: t for k, t in template.items()}}
    _dcp_load(ckpt / DCP_DIR, tree)
    return tree["model"]


def iter_model_tensors(ckpt: Path):
    """(parameter name, whole tensor) of a checkpoint's model, one tensor read at a time: DCP reads
    only the parts of the files that hold it, so at most one whole tensor is alive here (a
    quantizing load, hpcllm.infer.quantize)."""
    for key, t in _model_template(ckpt, allocate=False).items():
        name = key[len("model."):]
        tree = {"model": {name: torch.empty(t.shape, dtype=t.dtype)}}
        _dcp_load(ckpt / DCP_DIR, tree)
        yield name, tree["model"].pop(name)


def _model_template(ckpt: Path, allocate: bool = True) -> dict[str, torch.Tensor]:
    """{"model.NAME": empty tensor of its size and dtype} (on the meta device unless `allocate`), once
    every rank file of the checkpoint is known to be there."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp_dir = ckpt / DCP_DIR
    md = read_dcp_metadata(dcp_dir)
    device = "cpu" if allocate else "meta"
    template = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device=device)
                for k, m in md.state_dict_metadata.items()
                if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not template:
        raise CheckpointError(f"{dcp_dir / METADATA}: no model tensors in this checkpoint")
    check_fits(ckpt, {}, md)  # every part is there
    return template


def _dcp_load(dcp_dir: Path, tree: dict) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        try:
            dcp.load(tree, storage_reader=_reader(dcp_dir), planner=_planner(), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise CheckpointError(f"{dcp_dir}: cannot be read ({_why(e)})") from None
