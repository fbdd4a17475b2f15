"""Job specs: one YAML format for every job, loaded into typed dataclasses.

A job spec is a YAML file with `kind`, `name`, `run_dir` and one section per concern (`dist`, `data`,
`model`, `train`, `parallel`, `infer`, `slurm`). Each section is a dataclass owned by the package it configures
(`hpcllm/<pkg>/config.py`); this module only knows how to fill dataclasses from plain data, check the
types, apply `a.b=c` overrides from the command line and report mistakes with the key and the file.

    spec = load_spec("jobs/train_tiny.yaml", ["train.max_steps=50", "dist.backend=mpi"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from hpcllm.data.config import DataConfig
from hpcllm.comm.config import DistConfig
from hpcllm.errors import ConfigError
from hpcllm.fields import path_field
from hpcllm.infer.config import InferConfig
from hpcllm.jobs import KindName
from hpcllm.launch.config import SlurmConfig
from hpcllm.model.config import ModelConfig
from hpcllm.monitor.config import MetricsConfig
from hpcllm.parallel.config import ParallelConfig
from hpcllm.parallel.layout import check_backend, check_model, check_pipeline_batches
from hpcllm.train.config import TrainConfig

@dataclass
class JobSpec:
    kind: KindName  # the job kinds' registry (hpcllm.jobs) is the one list of them
    name: str
    run_dir: str = path_field("runs/default")
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # TensorBoard, Prometheus (hpcllm.monitor)

    def validate(self) -> None:  # what no single section can check on its own
        pc = self.parallel
        check_backend(pc, self.dist.backend)
        if (pc.shard == "full" or pc.tp > 1 or pc.pp > 1) and self.dist.backend == "auto":
            self.dist.backend = "torch"  # the one backend that carries FSDP2, DTensor and pipelining (NCCL on GPU, gloo on CPU)
        if pc.pp > 1:
            if self.kind == "infer":
                raise ValueError(f"parallel.pp={pc.pp}: inference is not pipelined (split a model over ranks with "
                                 "parallel.tp); set parallel.pp=1")
            if self.train.compile:
                raise ValueError("train.compile with parallel.pp > 1 is not implemented: set train.compile=false")
            if not self.train.global_batch_size:  # otherwise known with the world size (trainer, hpcllm plan)
                check_pipeline_batches(pc, self.train, self.train.grad_accum)
        if pc.sequence_parallel and self.train.seq_len % pc.tp:
            raise ValueError(f"parallel.sequence_parallel=true needs train.seq_len ({self.train.seq_len}) to be a "
                             f"multiple of parallel.tp={pc.tp}: each tp rank holds an equal slice of the sequence")
        if (pc.tp > 1 or pc.pp > 1) and not self.model.init:  # a model.init's shape is checked when it is read
            try:
                resolved = self.model.resolve(self.model.vocab_size or 1)  # the vocabulary does not matter here
            except ValueError:
                resolved = None  # the model section's own errors are reported where they are checked
            if resolved is not None:
                check_model(self.parallel, resolved)


# ----------------------------------------------------------------------------- dataclass <-> dict


def from_dict(cls: type, data: Any, *, where: str = "", source: str = "<spec>") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type.

    `where` is the dotted key prefix and `source` the file, both only used in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {_tname(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{_join(where, close[0])}'?)" if close else ""
        raise ConfigError(
            f"{source}: unknown key '{_join(where, key)}'{hint}; "
            f"known keys{' under ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = _join(where, name)
        kwargs[name] = _coerce(hints[name], value, key, source)
        if fields[name].metadata.get("path") and isinstance(kwargs[name], str) and kwargs[name]:
            kwargs[name] = expand_path(kwargs[name])
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        tp = hints[missing[0]]
        one_of = f" (one of {_describe(tp)})" if typing.get_origin(tp) is Literal else ""
        raise ConfigError(f"{source}: missing required key '{_join(where, missing[0])}'{one_of}")
    obj = cls(**kwargs)
    for name, f in fields.items():  # defaults of path fields are made absolute too
        if name not in kwargs and f.metadata.get("path") and getattr(obj, name):
            setattr(obj, name, expand_path(getattr(obj, name)))
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{source}: {where or 'spec'}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def expand_path(p: str) -> str:
    return os.path.abspath(os.path.expandvars(os.path.expanduser(p)))


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp`; allow the lossless int -> float widening only."""
    bad = ConfigError(f"{source}: '{key}' must be {_describe(tp)}, got {_tname(value)} {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: '{key}' must be one of {_describe(tp)}, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=key, source=source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        return _to_float(value, bad, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{source}: '{key}': unsupported field type {tp!r}")  # a bug in a section


def _to_float(value: Any, bad: ConfigError, key: str, source: str) -> float:
    """Numbers as people write them: YAML 1.1 reads `3e-4` and `1e6` as strings (it wants `3.0e-4`),
    so a string is taken in every form Python's float() accepts. Only finite values: no field
    means anything by nan or inf, and a nan slips through every range check."""
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)):
        raise bad
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value}")
    return value


# ----------------------------------------------------------------------------- YAML + overrides


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key=value (e.g. train.max_steps=100)")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{ov}': bad key '{key}'")
        if key.count(".") >= MAX_SPEC_DEPTH:
            raise ConfigError(f"override '{_clip(ov)}': more than {MAX_SPEC_DEPTH} keys deep")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except SpecTooLarge as e:
            raise ConfigError(f"override '{_clip(ov)}': {e}") from None
        except yaml.YAMLError:
            value = raw
        out.append((key.split("."), value, raw))
    return out


def apply_overrides(data: dict, overrides: list[str], cls: type = None) -> dict:
    """Set dotted keys in the raw mapping. Values are read as YAML (`3`, `true`, `[1,2]`); a field
    typed `str` keeps the text as written, so `name=007` stays "007"."""
    cls = cls or JobSpec
    for parts, value, raw in parse_overrides(overrides):
        node, tp = data, cls
        for i, part in enumerate(parts):
            tp = _field_type(tp, part)
            if i == len(parts) - 1:
                node[part] = raw if _is_str_type(tp) and not isinstance(value, str) else value
            else:
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = {}
                if not isinstance(nxt, dict):
                    raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
                node = nxt
    return data


def _field_type(tp: Any, name: str) -> Any:
    if tp is None or not dataclasses.is_dataclass(tp):
        return None
    hints = typing.get_type_hints(tp)
    return hints.get(name)  # unknown keys are reported by from_dict with a suggestion


def _is_str_type(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


# A job spec is a few kilobytes of settings. These bounds keep a hostile or broken one from exhausting
# the loader, or what walks the loaded data (overrides, checks, `hpcllm config`'s dump, the spec file
# `render` and `submit` write): aliases are allowed (anchors that share settings are ordinary YAML)
# but not a document that expands to more than MAX_SPEC_VALUES values through them ("billion
# laughs": 0.5 KB of aliases naming aliases is 10^9 values); nesting is at most MAX_SPEC_DEPTH
# deep (the sections are 2 levels; free-form fields such as model.rope_scaling a few more); a file
# is at most MAX_SPEC_BYTES. Overrides are read with the same loader. (A 1 MB spec of 45,000 input
# paths loads in about 2 s: a real spec of a few hundred values in milliseconds.)
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 64
MAX_SPEC_VALUES = 100_000


class SpecTooLarge(yaml.YAMLError):
    """A YAML document past the bounds above."""


class _BoundedComposer(Composer):
    """PyYAML's composer, counting as it goes: the nesting depth of each node, and the values each
    node stands for with its aliases expanded (an alias counts everything its anchor holds)."""

    def __init__(self):
        Composer.__init__(self)
        self._depth = 0
        self._values: dict[int, int] = {}  # id(node) -> values it holds, aliases expanded

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self._depth >= MAX_SPEC_DEPTH:
            raise SpecTooLarge(f"nested deeper than {MAX_SPEC_DEPTH} levels (line {line})")
        self._depth += 1
        try:
            node = Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1
        children = [] if isinstance(node, yaml.ScalarNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        self._values[id(node)] = n = 1 + sum(self._values.get(id(c), 1) for c in children)
        if n > MAX_SPEC_VALUES:
            raise SpecTooLarge(f"holds more than {MAX_SPEC_VALUES:,} values with its aliases expanded (line {line})")
        return node


try:
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None

if CParser is not None:  # libyaml parses (the C loader's speed); the composer (bounded) and constructor are PyYAML's

    class _BoundedLoader(_BoundedComposer, CParser, SafeConstructor, Resolver):
        def __init__(self, stream):
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

else:  # pragma: no cover - PyYAML built without libyaml

    class _BoundedLoader(Reader, Scanner, Parser, _BoundedComposer, SafeConstructor, Resolver):
        def __init__(self, stream):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            _BoundedComposer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


def load_yaml(text: str) -> Any:
    """yaml.safe_load within the bounds above (SpecTooLarge past one; other yaml.YAMLErrors as usual):
    no Python tags, no alias bombs, no nesting that recursion cannot follow."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: PyYAML's spread the problem and its context over several."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return " ".join(f"{context + ': ' if context else ''}{problem}{where}".split())


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job spec '{p}' not found" if not p.exists() else f"job spec '{p}' is not a file")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise ConfigError(f"{p}: is {p.stat().st_size:,} bytes; a job spec may have at most {MAX_SPEC_BYTES:,} "
                              "(they are a few kilobytes)")
        data = load_yaml(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"job spec '{p}' cannot be read: {e.strerror}") from None
    except SpecTooLarge as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at top level, got {_tname(data)}")
    return data


def load_spec(path: str | os.PathLike | None, overrides: list[str] = (), *, base: dict | None = None) -> JobSpec:
    """Read a job spec (or start from `base`), apply overrides, validate."""
    data = read_yaml(path) if path is not None else dict(base or {})
    data = apply_overrides(data, list(overrides))
    source = str(path) if path is not None else "<built-in spec>"
    if "name" not in data:
        data["name"] = Path(path).stem if path is not None else "job"
    return from_dict(JobSpec, data, source=source)


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
