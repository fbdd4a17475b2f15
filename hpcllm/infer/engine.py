"""Batched generation and scoring with a static KV cache.

    engine = Engine(model, device="cpu", max_batch_size=32)
    results = engine.generate(prompts, record_ids, SamplingParams(max_new_tokens=64))

Prompts are sorted by length and cut into batches, so rows of a batch need little padding; rows are
left-padded so that every row writes the same cache slot at each decode step. The cache is allocated
once, for the largest batch and the model's context. Rows that finish (stop token) drop out: the
batch is compacted when half of it is done, and the loop ends when all are. Results come back in
the callers' order. On CUDA the decode step can run in bf16 and be replayed as a CUDA graph; a model
whose decode step cannot be captured (an operation that is not capturable) is decoded eagerly after
a warning that names the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from hpcllm.errors import DataError, InferError
from hpcllm.infer.sampling import SamplingParams, choose, make_generators
from hpcllm.model.attention import KVCache, PaddedBatch, padded_positions_and_mask
from hpcllm.model.base import CausalLM

log = logging.getLogger("hpcllm.infer")


class PromptError(DataError, ValueError):
    """A prompt record the engine cannot run (empty, too long for the context)."""


@dataclass
class GenResult:
    record_id: int
    tokens: list[int]  # new tokens only (a stop token that ended the row is included)
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None  # log-probability of each chosen token
    truncated: int = 0  # prompt tokens dropped on the left by the truncate_left policy


@dataclass
class ScoreResult:
    record_id: int
    token_logprobs: list[float]
    logprob_sum: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob_sum / self.n_tokens) if self.n_tokens else float("nan")


CACHE_ROUND = 128  # cache lengths are multiples of this: few reallocations, aligned shapes


class Engine:
    def __init__(
        self,
        model: CausalLM,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 32,
        pad_id: int = 0,
        overflow: Literal["error", "truncate_left"] = "error",
        use_cuda_graphs: bool = False,
    ):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.ctx = model.config.block_size
        self.max_batch_size = max_batch_size
        self.pad_id = pad_id
        self.overflow = overflow
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.cache: KVCache | None = None  # allocated for the longest batch met so far (see _cache_for)
        self._graphs: dict[int, _DecodeGraph] = {}
        self.cuda_graph_fallback: str | None = None  # why decoding went eager although graphs were asked for

    # ------------------------------------------------------------------------------- helpers
    def _fit(self, prompt: list[int], record_id: int, room: int) -> tuple[list[int], int]:
        """Apply the context-overflow policy: the prompt plus `room` new tokens must fit."""
        if not prompt:
            raise PromptError(f"record {record_id}: empty prompt")
        if len(prompt) + room <= self.ctx:
            return prompt, 0
        if self.overflow == "truncate_left" and room < self.ctx:
            keep = self.ctx - room
            return prompt[-keep:], len(prompt) - keep
        raise PromptError(
            f"record {record_id}: prompt of {len(prompt)} tokens + {room} new tokens exceeds the model's "
            f"context of {self.ctx} (infer.overflow: truncate_left keeps the last {max(self.ctx - room, 0)})"
        )

    def _cache_for(self, length: int) -> KVCache:
        """The static KV cache, holding at least `length` positions for max_batch_size rows. Sized by
        what the prompts need, not by the model's context: Llama 3.2's 131,072 positions at batch 256
        would be 137 GB where 256 tokens take 0.3 GB. Batches come longest first, so it is allocated
        once per generate call at most; a captured decode graph belongs to one cache and goes with it."""
        if self.cache is None or self.cache.max_len < length:
            size = min(self.ctx, -(-length // CACHE_ROUND) * CACHE_ROUND)
            self.cache = None  # free the old one before allocating the new one
            self._graphs.clear()
            self.cache = self.model.new_kv_cache(self.max_batch_size, size, self.device, self.dtype)
        return self.cache

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first)."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[i : i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # ------------------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        record_ids: list[int],
        params: SamplingParams,
        *,
        return_logprobs: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[GenResult]:
        """Generate for every prompt; `progress(records_done, new_tokens)` is called after each batch."""
        params.validate()
        fitted = [self._fit(p, r, params.max_new_tokens) for p, r in zip(prompts, record_ids)]
        out: list[GenResult | None] = [None] * len(prompts)
        for idx in self._batches([len(p) for p, _ in fitted]):
            res = self._generate_batch([fitted[i][0] for i in idx], [record_ids[i] for i in idx], params, return_logprobs)
            for i, r in zip(idx, res):
                r.truncated = fitted[i][1]
                out[i] = r
            if progress is not None:
                progress(len(idx), sum(len(r.tokens) for r in res))
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts, record_ids, params: SamplingParams, want_logprobs: bool) -> list[GenResult]:
        B = len(prompts)
        batch = PaddedBatch.build(prompts, self.pad_id, self.device)
        L = batch.tokens.shape[1]
        gens = None if params.greedy else make_generators(params.seed, record_ids)
        stop = set(params.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reason = ["length"] * B
        active = list(range(B))  # original row of each cache row
        pad = batch.pad
        cache = self._cache_for(L + params.max_new_tokens)
        with self._autocast():
            pos, mask = padded_positions_and_mask(pad, 0, L)
            logits, _ = self.model(batch.tokens, cache=cache, positions=pos, mask=mask)
        logits = logits[:, -1].float()
        done = [False] * B
        for step in range(params.max_new_tokens):
            _check_finite(logits, [record_ids[r] for r in active])
            rows_gens = None if gens is None else [gens[r] for r in active]
            nxt = choose(logits, params, rows_gens)
            lp = torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None]).squeeze(1).tolist() if want_logprobs else None
            chosen = nxt.tolist()
            running = []  # cache rows still generating
            for j, r in enumerate(active):
                if done[r]:  # finished earlier, kept in the batch until the next compaction
                    continue
                tokens[r].append(chosen[j])
                if lp is not None:
                    logps[r].append(lp[j])
                if chosen[j] in stop:
                    reason[r], done[r] = "stop", True
                else:
                    running.append(j)
            if not running or step == params.max_new_tokens - 1:
                break
            if len(running) <= len(active) // 2:  # compact: finished rows stop costing compute
                sel = torch.tensor(running, device=self.device)
                cache.compact(sel)
                pad, nxt = pad[sel], nxt[sel]
                active = [active[j] for j in running]
            logits = self._decode(nxt[:, None], pad, L + step)
        return [
            GenResult(record_ids[r], tokens[r], reason[r], logps[r] if want_logprobs else None) for r in range(B)
        ]

    def _decode(self, tok: torch.Tensor, pad: torch.Tensor, slot: int) -> torch.Tensor:
        """One decode step for the first tok.shape[0] cache rows, writing cache slot `slot`."""
        if self.use_cuda_graphs:
            graph = self._graphs.get(tok.shape[0]) or self._capture(tok, pad, slot)
            if graph is not None:
                return graph.run(tok, pad, slot)
        with self._autocast():
            pos, mask = padded_positions_and_mask(pad, slot, 1)
            logits, _ = self.model(tok, cache=self.cache, start=slot, positions=pos, mask=mask)
        return logits[:, -1].float()

    def _capture(self, tok: torch.Tensor, pad: torch.Tensor, slot: int) -> _DecodeGraph | None:
        """The decode graph for tok.shape[0] rows, captured at this step; None (and eager decoding from
        now on, announced once) when the model's step cannot be captured. Eager decoding computes the
        same step, so the outputs do not change — only the speed, which is why it is a warning."""
        try:
            graph = _DecodeGraph(self, tok, pad, slot)
        except Exception as e:  # noqa: BLE001 — whatever the model does that a graph cannot hold
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.use_cuda_graphs, self.cuda_graph_fallback = False, reason
            self._graphs.clear()
            dtensor = "tensor-parallel (DTensor) " if any(hasattr(p, "placements") for p in self.model.parameters()) \
                else ""
            log.warning("CUDA-graph decode is off for this %s%s model: capturing its decode step failed (%s); decoding "
                        "eagerly instead (same outputs, slower)", dtensor, type(self.model).__name__, reason)
            return None
        self._graphs[tok.shape[0]] = graph
        return graph

    # ------------------------------------------------------------------------------- score
    @torch.inference_mode()
    def score(self, prompts: list[list[int]], continuations: list[list[int]], record_ids: list[int]) -> list[ScoreResult]:
        """Log-probability of each continuation token given the prompt and the tokens before it."""
        seqs = []
        for p, c, r in zip(prompts, continuations, record_ids):
            if not c:
                raise PromptError(f"record {r}: empty continuation to score")
            full, _ = self._fit(p + c, r, 0)
            if len(full) < len(c) + 1:
                raise PromptError(f"record {r}: continuation of {len(c)} tokens leaves no room for the prompt "
                                  f"in a context of {self.ctx}")
            seqs.append(full)
        out: list[ScoreResult | None] = [None] * len(seqs)
        for idx in self._batches([len(s) for s in seqs]):
            batch = PaddedBatch.build([seqs[i] for i in idx], self.pad_id, self.device)
            pos, mask = padded_positions_and_mask(batch.pad, 0, batch.tokens.shape[1])
            with self._autocast():
                logits, _ = self.model(batch.tokens, positions=pos, mask=mask)
            _check_finite(logits, [record_ids[i] for i in idx])
            logp = torch.log_softmax(logits.float(), dim=-1)
            for j, i in enumerate(idx):
                n = len(continuations[i])
                targets = batch.tokens[j, -n:]
                lp = logp[j, -n - 1 : -1].gather(1, targets[:, None]).squeeze(1)
                out[i] = ScoreResult(record_ids[i], lp.tolist(), float(lp.double().sum()), n)
        return out  # type: ignore[return-value]


def _check_finite(logits: torch.Tensor, record_ids: list[int]) -> None:
    """NaN or infinite logits (weights of a diverged run) would be "sampled" as token 0 and written
    as a finished output: refuse instead, naming a record."""
    bad = ~torch.isfinite(logits).flatten(1).all(dim=1)
    if bool(bad.any()):
        rid = record_ids[int(bad.nonzero()[0, 0])]
        raise InferError(f"record {rid}: the model produced non-finite logits (are its weights finite?)")


class _DecodeGraph:
    """The decode step for a fixed batch size captured as a CUDA graph: static input buffers are
    filled, the graph replayed, and the logits read from its static output.

    It is made at the first decode step of its batch size, from that step's own inputs: the warm-up
    runs before the capture really execute, and each writes the step's cache slot — so they must
    write exactly what the step writes. (Warming up on zeroed buffers wrote slot 0, the first token
    of the longest prompt, with the keys and values of token 0 under an all-masked attention.)"""

    def __init__(self, engine: Engine, tok: torch.Tensor, pad: torch.Tensor, slot: int):
        self.engine = engine
        B, dev, S = tok.shape[0], engine.device, engine.cache.max_len
        self.tok = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.slot = torch.zeros((1,), dtype=torch.long, device=dev)
        self.pos = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.mask = torch.zeros((B, 1, 1, S), dtype=torch.bool, device=dev)
        self.keys = torch.arange(S, device=dev)
        self._fill(tok, pad, slot)
        self.out = self._record()

    def _record(self) -> torch.Tensor:
        """Warm up kernels and allocations outside the graph (on a side stream, as capture wants),
        then capture the step; returns its static output."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = self._step()
        return out

    def _replay(self) -> None:
        self.graph.replay()

    def _step(self) -> torch.Tensor:
        with self.engine._autocast():
            logits, _ = self.engine.model(self.tok, cache=self.engine.cache, start=self.slot, positions=self.pos,
                                          mask=self.mask)
        return logits[:, -1].float()

    def _fill(self, tok: torch.Tensor, pad: torch.Tensor, slot: int) -> None:
        """The captured buffers for this step: position per row, keys from the row's first real
        token up to and including this slot; the cache slot index itself."""
        self.tok.copy_(tok)
        self.slot.fill_(slot)
        self.pos.copy_((slot - pad)[:, None])
        self.mask.copy_(((self.keys[None, :] >= pad[:, None]) & (self.keys[None, :] <= slot))[:, None, None, :])

    def run(self, tok: torch.Tensor, pad: torch.Tensor, slot: int) -> torch.Tensor:
        self._fill(tok, pad, slot)
        self._replay()
        return self.out.clone()
