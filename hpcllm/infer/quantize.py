"""Weight-only quantization for inference (`infer.quantize: none | int8 | int4`), on PyTorch's own kernels.

Every `nn.Linear` of the blocks (attention and MLP projections) becomes a `QuantLinear`: its weight is
stored as int8 with one scale per output channel (symmetric), or as int4 in groups of `INT4_GROUP`
input columns with a scale and a zero point per group (asymmetric, the "tinygemm" layout). Embeddings,
norms, biases and the output head stay in full precision (the head: see `quantizable`).
docs/inference.md ("Quantized weights") has the measured cost.

Kernels (no extra dependency; torchao 0.18 wraps the same ones and was not faster here):
  int8  torch._weight_int8pack_mm — CPU and CUDA. On the CPU its fp32 path is not vectorised (~40x
        slower than a plain fp32 matmul, measured), its bf16 path is as fast as fp32: activations go
        in as bf16 on the CPU and the result comes back in the caller's dtype.
  int4  torch._weight_int4pack_mm_for_cpu (CPU) / torch._weight_int4pack_mm (CUDA, sm80+), bf16
        activations on both; the packed layout is the device's own, so an int4 model is packed for
        the device it will run on (`quantize_model(..., device)` / `load_quantized(..., device)`).

Loading streams (`load_quantized`): the model is built on the meta device, its linear layers are
swapped for QuantLinears before anything is allocated, and each tensor read from the checkpoint is
quantized as it arrives: peak memory ~ the quantized model plus one full-precision tensor (int4: two,
while a tensor is quantized; measured in docs/inference.md).
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

from hpcllm.errors import ConfigError

log = logging.getLogger("hpcllm.infer")

SCHEMES = ("none", "int8", "int4")
INT4_GROUP = 32  # input columns per int4 scale/zero (torchao's default is 128; 32 costs less quality)
INT4_INNER_K_TILES = 2  # the packing's tile depth: 2 allows any in_features that is a multiple of 32


# ------------------------------------------------------------------------------------ quantizing


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (N, K), fp32 scale (N,)): symmetric, one scale per output channel; w ~ q * scale."""
    w = w.detach().float().contiguous()  # elementwise ops keep a transposed input's strides; the kernels need rows
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_weight(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 codes 0..15 (N, K), bf16 scales_and_zeros (K/group, N, 2)): asymmetric per group of
    `group` input columns in the tinygemm convention, w ~ (q - 8) * scale + zero."""
    w = w.detach().float().contiguous()  # elementwise ops keep a transposed input's strides; the kernels need rows
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + scale * 8
    # the codes are computed against the bf16 scale and zero the kernel will use; in place, and
    # through uint8, so that a large matrix costs about one more full-precision copy while loading
    scale_b, zero_b = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
    q = g - (zero_b.float() - 8 * scale_b.float())[..., None]
    q = q.div_(scale_b.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    q = q.reshape(n, k).to(torch.int32)
    sz = torch.stack([scale_b, zero_b], dim=-1).transpose(0, 1).contiguous()
    return q, sz


def dequantized(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The full-precision weight a scheme's quantized form of `w` stands for (probe and tests)."""
    if scheme == "int8":
        q, scale = int8_weight(w)
        return q.float() * scale[:, None]
    q, sz = int4_weight(w)
    n, k = q.shape
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # (N, K/group) each
    g = (q.reshape(n, k // INT4_GROUP, INT4_GROUP).float() - 8) * scale[..., None] + zero[..., None]
    return g.reshape(n, k)


def int4_pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 codes (N, K) -> the int4 kernel's packed weight on `device`."""
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), INT4_INNER_K_TILES)
    # CUDA takes two codes per byte, the even column in the high nibble
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
    return torch._convert_weight_to_int4pack(nibbles.contiguous(), INT4_INNER_K_TILES)


def fits_scheme(linear_shape: tuple[int, int], scheme: str) -> bool:
    """Whether a (out_features, in_features) weight has a shape the scheme's kernel takes."""
    n, k = linear_shape
    if scheme == "int4":
        return k % INT4_GROUP == 0 and k % (16 * INT4_INNER_K_TILES) == 0 and n % 8 == 0
    return True


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored quantized (`scheme` int8 or int4), packed for `device_type`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, device_type: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.device_type = scheme, device_type
        # placeholders until set_weight (their shapes depend on the device's packing)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(0))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, {self.scheme}"

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight into this layer (on the CPU; int4 packs on its device)."""
        if self.scheme == "int8":
            q, s = int8_weight(w)
            self.qweight, self.scales = q, s
        else:
            q, sz = int4_weight(w)
            self.qweight = int4_pack(q, torch.device(self.device_type))
            self.scales = sz.to(self.qweight.device)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating-point buffers: the scales keep the dtype the kernel takes
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.qweight.device.type or (self.scheme == "int4" and x.device.type != self.device_type):
            raise RuntimeError(f"QuantLinear ({self.scheme}, packed for {self.device_type}) got input on {x.device}: "
                               "quantize the model for the device it runs on")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.scheme == "int8":
            # the CPU kernel's fp32 path is not vectorised: bf16 in (see the module docstring)
            cdt = torch.bfloat16 if x.device.type == "cpu" else x.dtype
            y = torch._weight_int8pack_mm(x2.to(cdt), self.qweight, self.scales.to(cdt))
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, INT4_GROUP, self.scales)
        else:
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.qweight, INT4_GROUP, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


# ------------------------------------------------------------------------------------ which layers


def quantizable(model: nn.Module, scheme: str) -> dict[str, nn.Linear]:
    """{module path: nn.Linear} of the layers `scheme` replaces: every Linear of the blocks whose
    shape the kernel takes. The output head (the family's `head_modules`) stays in full precision:
    it makes the logits themselves, and quantized it cost most of the greedy agreement measured
    (int8: 0.91 of the tokens before the first difference with it, 0.98 without; docs/inference.md)."""
    head = set(getattr(model, "head_modules", ()))
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name in head:
            continue
        if fits_scheme(tuple(m.weight.shape), scheme):
            out[name] = m
        else:
            log.warning("infer.quantize=%s: %s %s stays in full precision (the kernel needs in_features a "
                        "multiple of %d and out_features of 8)", scheme, name, tuple(m.weight.shape), INT4_GROUP)
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _quant_module(lin: nn.Linear, scheme: str, device: torch.device) -> QuantLinear:
    return QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme, device.type)


# ------------------------------------------------------------------------------------ entry points


def check_supported(scheme: str, device: torch.device | str, tp: int = 1) -> None:
    """Refuse, in one line naming infer.quantize, a scheme this platform cannot run: a device whose
    PyTorch has no kernel for it (probed once on a tiny matrix), or tensor-parallel weights."""
    if scheme == "none":
        return
    if scheme not in SCHEMES:
        raise ConfigError(f"infer.quantize={scheme!r} is not one of {', '.join(SCHEMES)}")
    device = torch.device(device)
    if tp > 1:
        raise ConfigError(f"infer.quantize={scheme} is not supported with parallel.tp={tp}: tensor-parallel layers "
                          "split full-precision weights (DTensors); use infer.quantize=none, or parallel.tp=1 (quantized, "
                          "the linear layers take about 1/4 (int8) or 1/6 (int4) of their fp32 memory)")
    why = _kernel_problem(scheme, device.type, device.index)
    if why:
        raise ConfigError(f"infer.quantize={scheme} cannot run on {device}: {why}; use infer.quantize=none"
                          f"{' or int8' if scheme == 'int4' else ''}")


@lru_cache(maxsize=None)
def _kernel_problem(scheme: str, device_type: str, index) -> str | None:
    """None when the scheme's kernel runs on this device (a 64x64 probe against the dequantized
    reference), else why not, in a few words."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(64, 64, generator=g) * 0.02, torch.randn(4, 64, generator=g)
        lin = QuantLinear(64, 64, False, scheme, device_type)
        lin.set_weight(w)
        lin.to(device)
        y = lin(x.to(device)).float().cpu()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"this PyTorch ({torch.__version__}) has no {scheme} kernel for it ({first[:160]})"
    ref = x @ dequantized(w, scheme).t()  # what the kernel must compute, up to its bf16 activations
    if not torch.allclose(y, ref, atol=0.02 * ref.abs().max().item()):
        return f"its {scheme} kernel gives wrong results on a probe (max error {float((y - ref).abs().max()):.3g})"
    return None


def quantize_model(model: nn.Module, scheme: str, device: torch.device | str = "cpu") -> nn.Module:
    """Replace the model's linear layers (in place) by `scheme`'s QuantLinears, packed for `device`;
    the model may be on the CPU in full precision (bench, tests). Returns the model, for chaining;
    move it to `device` afterwards (`Engine` does)."""
    if scheme == "none":
        return model
    device = torch.device(device)
    for name, lin in quantizable(model, scheme).items():
        q = _quant_module(lin, scheme, device)
        q.set_weight(lin.weight)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().float().clone(), requires_grad=False)
        _swap(model, name, q)
    return model


def load_quantized(model: nn.Module, scheme: str, device: torch.device | str,
                   stream: Callable[[nn.Module, Callable[[str, torch.Tensor], None]], None]) -> nn.Module:
    """A quantized model from a model built on the meta device and a weights stream:
    `stream(model_for_names, put)` calls put(parameter name, whole full-precision tensor) once per
    tensor (hpcllm.model.hf.stream_hf_weights, hpcllm.checkpoint.stream_checkpoint). Each linear
    weight is quantized as it arrives; nothing else is allocated in full precision but the layers
    kept so (embeddings, norms, biases). The model stays on the CPU; int4 is packed for `device`."""
    device = torch.device(device)
    names = copy.deepcopy(model)  # the original names and shapes, for the stream to check against
    targets = {f"{name}.weight": name for name in quantizable(model, scheme)}
    for name in targets.values():
        _swap(model, name, _quant_module(model.get_submodule(name), scheme, device))
    model = model.materialize("cpu")  # only what is kept in full precision gets storage here
    own = dict(model.named_parameters(remove_duplicate=False))

    def put(name: str, t: torch.Tensor) -> None:
        if name in targets:
            model.get_submodule(targets[name]).set_weight(t)
        else:
            with torch.no_grad():
                own[name].copy_(t)

    stream(names, put)
    return model.eval().requires_grad_(False)
