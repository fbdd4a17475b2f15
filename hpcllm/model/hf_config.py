"""An HF model directory's config.json, read without torch: the family (its `model_type`) and the
ModelConfig, or a one-line WeightsError naming the file and the field. `hpcllm plan` reads a
`model.init` directory with this on a login node; hpcllm.model.hf loads the weights after it.
"""

from __future__ import annotations

import json
from pathlib import Path

from hpcllm.errors import DataError
from hpcllm.model.config import ModelConfig
from hpcllm.paths import model_file


class WeightsError(DataError, ValueError):
    """A weights file or HF directory hpcllm cannot load (exit 5, like other bad input data)."""


def model_dir(path: str | Path) -> Path:
    """The HF directory of `path` (a directory, or a .safetensors file inside one)."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    if not model_file(d, "config.json").is_file():
        raise WeightsError(f"{d}: no config.json — not an HF model directory (hpcllm needs the config to know the "
                           "model's shape and family)")
    return d


def read_config(path: str | Path) -> tuple[dict, ModelConfig]:
    """(raw config.json, ModelConfig) of an HF directory; refuses what no family implements."""
    from hpcllm.model.registry import arch_for_model_type, get_family_config

    d = model_dir(path)
    f = model_file(d, "config.json")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{f}: not valid JSON ({e})") from None
    arch = arch_for_model_type(raw.get("model_type", ""))
    if arch is None:
        from hpcllm.model.registry import FAMILIES

        known = ", ".join(t for fam in FAMILIES.values() for t in fam.hf_model_types)
        raise WeightsError(f"{f}: model_type={raw.get('model_type')!r} is not supported (supported: {known})")
    try:
        cfg = get_family_config(arch).config_from_hf(raw)
        cfg = cfg.resolve(cfg.vocab_size)
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{f}: missing or bad field {e}") from None
    except ValueError as e:
        raise WeightsError(f"{f}: {e}") from None
    return raw, cfg
