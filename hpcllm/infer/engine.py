"""Batched generation and scoring: continuous batching over a paged KV cache with shared prefixes.

    engine = Engine(model, device="cpu", max_batch_size=32)
    results = engine.generate(prompts, record_ids, SamplingParams(max_new_tokens=64))

`generate` keeps up to max_batch_size rows in flight. Each step first admits waiting prompts into
free rows and computes them in one prefill forward (only what the pool does not already hold: a
shared system prompt is computed once, hpcllm.infer.blocks), then runs one decode forward for every
other row. A row that finishes (stop token, its length) leaves at once and the next prompt takes
its place, so a batch never waits for its longest row. Each row has its own positions and cache
blocks (hpcllm.model.paged); results come back in the callers' order. Waiting prompts are taken
longest first, so rows admitted together need little padding.

On CUDA the decode step can run in bf16 and be replayed as a CUDA graph (one per batch-size and
cache-length bucket); a model whose decode step cannot be captured is decoded eagerly after a
warning that names the reason. `score` runs each batch in one forward without a cache.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from hpcllm.errors import DataError, InferError
from hpcllm.infer.blocks import BlockPool
from hpcllm.infer.sampling import SamplingParams, choose, make_generators
from hpcllm.model.base import CausalLM
from hpcllm.model.paged import SCRATCH

log = logging.getLogger("hpcllm.infer")


class PromptError(DataError, ValueError):
    """A prompt record the engine cannot run (empty, too long for the context)."""


@dataclass
class GenResult:
    record_id: int
    tokens: list[int]  # new tokens only (a stop token that ended the row is included)
    # stop: a stop token (the last of `tokens`); stop_string: `stop_when` said so; length: the limit
    finish_reason: Literal["stop", "stop_string", "length"]
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


@dataclass
class _Row:
    """A prompt in flight: its cache blocks, how many of its tokens the cache holds, what it made."""

    index: int  # in the caller's list
    record_id: int
    prompt: list[int]
    budget: int  # new tokens at most
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens found in the pool
    length: int = 0  # tokens whose keys and values are in the cache
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str = ""  # set when it finished


BLOCK_SIZE = 16  # tokens per KV-cache block: the unit of allocation and of prefix sharing
GRAPH_BLOCKS = 8  # CUDA-graph decode: cache lengths are bucketed to multiples of this many blocks


@dataclass
class EngineStats:
    """What the last `generate` call did (hpcllm bench infer prints it)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys the pool already held
    new_tokens: int = 0
    prefill_forwards: int = 0
    decode_steps: int = 0
    peak_cache_bytes: int = 0  # blocks held at the peak
    pool_bytes: int = 0  # the pool's size at the end
    cache_bytes_per_token: float = 0.0  # held blocks' bytes per in-flight token, averaged over decode steps


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
        share_prefixes: bool = True,
    ):
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.ctx = model.config.block_size
        self.max_batch_size = max_batch_size
        self.pad_id = pad_id
        self.overflow = overflow
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.share_prefixes = share_prefixes
        self.pool: BlockPool | None = None  # made at the first generate call, kept (and its prefixes) after it
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self.cuda_graph_fallback: str | None = None  # why decoding went eager although graphs were asked for
        self.stats = EngineStats()

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

    @property
    def cache(self):
        return None if self.pool is None else self.pool.cache

    def _pool(self) -> BlockPool:
        """The block pool: it starts at 8 blocks a row and doubles when full, up to every row at the
        model's context, so memory follows what rows hold (Llama 3.2's 131,072 positions at batch 256
        would be 137 GB where 256 tokens a row take 0.3 GB)."""
        if self.pool is None:
            per_row = -(-self.ctx // BLOCK_SIZE)
            cache = self.model.new_paged_kv_cache(1 + self.max_batch_size * min(8, per_row), BLOCK_SIZE, self.device,
                                                  self.dtype)
            self.pool = BlockPool(cache, 1 + self.max_batch_size * per_row, self.share_prefixes)
        return self.pool

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first)."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return [order[i : i + self.max_batch_size] for i in range(0, len(order), self.max_batch_size)]

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
        max_new_tokens: list[int] | None = None,
        stop_when: Callable[[list[int]], bool] | None = None,
    ) -> list[GenResult]:
        """Generate for every prompt; `progress(records_done, new_tokens)` is called as rows finish.
        `max_new_tokens`: a record's own limit, instead of params.max_new_tokens. `stop_when(tokens)`:
        asked after each new token that is not a stop token; True ends the row (a stop string is
        complete: its row's place goes to the next prompt at once)."""
        params.validate()
        budgets = max_new_tokens or [params.max_new_tokens] * len(prompts)
        fitted = [self._fit(p, r, n) for p, r, n in zip(prompts, record_ids, budgets)]
        gens = None if params.greedy else make_generators(params.seed, record_ids)
        waiting = deque(sorted(range(len(prompts)), key=lambda i: (-len(fitted[i][0]), i)))
        pool = self._pool()
        stats = self.stats = EngineStats()
        reused0 = pool.reused_tokens
        per_token: list[float] = []
        out: list[GenResult | None] = [None] * len(prompts)
        running: list[_Row] = []
        stop = set(params.stop_token_ids)

        def advance(rows: list[_Row], logits: torch.Tensor) -> None:
            """Choose each row's next token; a row that stops or reaches its budget finishes."""
            _check_finite(logits, [r.record_id for r in rows])
            nxt = choose(logits, params, None if gens is None else [gens[r.index] for r in rows])
            lp = torch.log_softmax(logits, dim=-1).gather(1, nxt[:, None]).squeeze(1).tolist() \
                if return_logprobs else None
            for j, (r, t) in enumerate(zip(rows, nxt.tolist())):
                r.tokens.append(t)
                if lp is not None:
                    r.logprobs.append(lp[j])
                if t in stop:
                    r.reason = "stop"
                elif stop_when is not None and stop_when(r.tokens):
                    r.reason = "stop_string"
                elif len(r.tokens) >= r.budget:
                    r.reason = "length"

        try:
            while waiting or running:
                admitted = []
                while waiting and len(running) < self.max_batch_size:
                    prompt = fitted[waiting[0]][0]
                    if admitted and pool.reads_pending(prompt):
                        break  # its prefix is being computed in this step: it comes in at the next one
                    i = waiting.popleft()
                    blocks, cached = pool.admit(prompt)
                    row = _Row(i, record_ids[i], prompt, budgets[i], blocks, cached, cached)
                    running.append(row)
                    admitted.append(row)
                    stats.prompt_tokens += len(prompt)
                decoding = [r for r in running if r.tokens and not r.reason]
                if admitted:
                    logits = self._prefill(admitted)[:, 0]
                    pool.written()
                    advance(admitted, logits)
                if decoding:
                    for r in decoding:  # a row crossing into a new block gets one
                        if r.length == len(r.blocks) * BLOCK_SIZE:
                            r.blocks.append(pool.allocate())
                    held = pool.held * pool.cache.bytes_per_block
                    per_token.append(held / sum(r.length + 1 for r in running))
                    stats.peak_cache_bytes = max(stats.peak_cache_bytes, held)
                    advance(decoding, self._decode(decoding))
                finished = [r for r in running if r.reason]
                if finished:
                    for r in finished:
                        pool.release(r.blocks)
                        out[r.index] = GenResult(r.record_id, r.tokens, r.reason,
                                                 r.logprobs if return_logprobs else None, fitted[r.index][1])
                    running = [r for r in running if not r.reason]
                    if progress is not None:
                        progress(len(finished), sum(len(r.tokens) for r in finished))
        except BaseException:
            # the pool stays consistent for the next call, and holds no prefix whose keys a failed
            # prefill may not have written
            for r in running:
                pool.release(r.blocks)
            pool.forget_prefixes()
            raise
        stats.reused_tokens = pool.reused_tokens - reused0
        stats.new_tokens = sum(len(r.tokens) for r in out)
        stats.pool_bytes = pool.cache.n_blocks * pool.cache.bytes_per_block
        stats.cache_bytes_per_token = sum(per_token) / len(per_token) if per_token else 0.0
        return out  # type: ignore[return-value]

    def _prefill(self, rows: list[_Row], at: list[list[int]] | None = None) -> torch.Tensor:
        """One forward over the admitted rows' prompt tokens that the pool does not hold yet (right-
        padded to the longest; padding writes the scratch block); the logits (B, K, V) at positions `at`
        of each row's computed tokens (padded with its last), by default its last token's (K = 1)."""
        B, bs = len(rows), BLOCK_SIZE
        new = [len(r.prompt) - r.cached for r in rows]
        T, n = max(new), max(len(r.blocks) for r in rows)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        wblock = torch.full((B, T), SCRATCH, dtype=torch.long)
        tables = torch.full((B, n), SCRATCH, dtype=torch.long)
        for b, r in enumerate(rows):
            k = new[b]
            tokens[b, :k] = torch.tensor(r.prompt[r.cached :], dtype=torch.long)
            positions[b, :k] = torch.arange(r.cached, r.cached + k)
            table = torch.tensor(r.blocks, dtype=torch.long)
            tables[b, : len(r.blocks)] = table
            wblock[b, :k] = table[positions[b, :k] // bs]
            r.length = len(r.prompt)
        keys = torch.arange(n * bs)
        # a query sees its row's keys up to its own position; a padding query (position 0) sees key 0
        mask = keys[None, None, :] <= positions[:, :, None]
        dev = self.device
        self.pool.cache.set_batch(tables.to(dev), wblock.to(dev), (positions % bs).to(dev))
        at = at or [[k - 1] for k in new]
        K = max(len(a) for a in at)
        want = torch.tensor([a + a[-1:] * (K - len(a)) for a in at], device=dev)
        with self._autocast():
            logits, _ = self.model(tokens.to(dev), cache=self.pool.cache, positions=positions.to(dev),
                                   mask=mask[:, None].to(dev), logits_at=want)
        self.stats.prefill_forwards += 1
        return logits.float()

    def _decode(self, rows: list[_Row]) -> torch.Tensor:
        """One decode step for `rows`: each feeds its last token at its own position."""
        self.stats.decode_steps += 1
        n = max(len(r.blocks) for r in rows)
        if self._graphs and next(iter(self._graphs.values())).pool_k is not self.pool.cache.k:
            self._graphs.clear()  # the pool grew: the graphs read the old one
        if self.use_cuda_graphs:
            key = (_bucket(len(rows)), -(-n // GRAPH_BLOCKS) * GRAPH_BLOCKS)
            graph = self._graphs.get(key) or self._capture(key, rows)
            if graph is not None:
                return graph.run(rows)
        inputs = _decode_inputs(rows, len(rows), n, self.device)
        for r in rows:
            r.length += 1
        return self._decode_step(*inputs)

    def _decode_step(self, tok, pos, tables, wblock, woffset, mask) -> torch.Tensor:
        self.pool.cache.set_batch(tables, wblock, woffset)
        with self._autocast():
            logits, _ = self.model(tok, cache=self.pool.cache, positions=pos, mask=mask)
        return logits[:, -1].float()

    def _capture(self, key: tuple[int, int], rows: list[_Row]) -> _DecodeGraph | None:
        """The decode graph for this (batch, cache length) bucket, captured at this step; None (and
        eager decoding from now on, announced once) when the model's step cannot be captured. Eager
        decoding computes the same step, so the outputs do not change — only the speed, which is why
        it is a warning."""
        try:
            graph = _DecodeGraph(self, key, rows)
        except Exception as e:  # noqa: BLE001 — whatever the model does that a graph cannot hold
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.use_cuda_graphs, self.cuda_graph_fallback = False, reason
            self._graphs.clear()
            dtensor = "tensor-parallel (DTensor) " if any(hasattr(p, "placements") for p in self.model.parameters()) \
                else ""
            log.warning("CUDA-graph decode is off for this %s%s model: capturing its decode step failed (%s); decoding "
                        "eagerly instead (same outputs, slower)", dtensor, type(self.model).__name__, reason)
            return None
        self._graphs[key] = graph
        return graph

    # ------------------------------------------------------------------------------- score
    @torch.inference_mode()
    def score(self, prompts: list[list[int]], continuations: list[list[int]], record_ids: list[int]) -> list[ScoreResult]:
        """Log-probability of each continuation token given the prompt and the tokens before it. Each
        batch is one forward through the paged cache, so records that begin alike (one document
        scored against several continuations) compute what they share once."""
        seqs = []
        for p, c, r in zip(prompts, continuations, record_ids):
            if not c:
                raise PromptError(f"record {r}: empty continuation to score")
            full, _ = self._fit(p + c, r, 0)
            if len(full) < len(c) + 1:
                raise PromptError(f"record {r}: continuation of {len(c)} tokens leaves no room for the prompt "
                                  f"in a context of {self.ctx}")
            seqs.append(full)
        pool = self._pool()
        out: list[ScoreResult | None] = [None] * len(seqs)
        for idx in self._batches([len(s) for s in seqs]):
            rows = []
            try:
                for i in idx:  # the last prompt token and every continuation token are computed
                    blocks, cached = pool.admit(seqs[i], reuse_before=len(seqs[i]) - len(continuations[i]) - 1)
                    rows.append(_Row(i, record_ids[i], seqs[i], 0, blocks, cached, cached))
                # logits at the positions that predict each continuation token, counted from the row's
                # first computed token
                at = [list(range(len(r.prompt) - len(continuations[r.index]) - 1 - r.cached, len(r.prompt) - 1 - r.cached))
                      for r in rows]
                logits = self._prefill(rows, at)
                pool.written()
                _check_finite(logits, [r.record_id for r in rows])
            except BaseException:
                pool.release([b for r in rows for b in r.blocks])
                pool.forget_prefixes()
                raise
            pool.release([b for r in rows for b in r.blocks])
            logp = torch.log_softmax(logits, dim=-1)
            for j, r in enumerate(rows):
                c = continuations[r.index]
                targets = torch.tensor(r.prompt[-len(c):], device=logp.device)
                lp = logp[j, : len(c)].gather(1, targets[:, None]).squeeze(1)
                out[r.index] = ScoreResult(r.record_id, lp.tolist(), float(lp.double().sum()), len(c))
        return out  # type: ignore[return-value]


def _check_finite(logits: torch.Tensor, record_ids: list[int]) -> None:
    """NaN or infinite logits (weights of a diverged run) would be "sampled" as token 0 and written
    as a finished output: refuse instead, naming a record."""
    bad = ~torch.isfinite(logits).flatten(1).all(dim=1)
    if bool(bad.any()):
        rid = record_ids[int(bad.nonzero()[0, 0])]
        raise InferError(f"record {rid}: the model produced non-finite logits (are its weights finite?)")


def _bucket(n: int) -> int:
    """Batch sizes a decode graph is captured for: powers of two (fewer graphs; spare rows are idle)."""
    return 1 << (n - 1).bit_length()


def _decode_inputs(rows: list[_Row], B: int, n: int, device):
    """The decode step's tensors for `rows`, padded to B rows of n blocks: token, position, block
    tables, where the new keys go, and the mask (a row sees its keys up to its new one). Spare rows
    feed token 0 at position 0, write the scratch block and see its first key."""
    bs = BLOCK_SIZE
    tok = torch.zeros((B, 1), dtype=torch.long)
    pos = torch.zeros((B, 1), dtype=torch.long)
    tables = torch.full((B, n), SCRATCH, dtype=torch.long)
    wblock = torch.full((B, 1), SCRATCH, dtype=torch.long)
    for b, r in enumerate(rows):
        tok[b, 0], pos[b, 0] = r.tokens[-1], r.length
        tables[b, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.long)
        wblock[b, 0] = r.blocks[r.length // bs]
    mask = (torch.arange(n * bs)[None, :] <= pos)[:, None, None, :]
    return tuple(t.to(device) for t in (tok, pos, tables, wblock, pos % bs, mask))


class _DecodeGraph:
    """The decode step for one (batch, cache length) bucket captured as a CUDA graph: static input
    buffers are filled, the graph replayed, and the logits read from its static output. The pool's
    tensors must not move while it lives: growing the pool drops every graph (Engine._decode).

    It is made at the first decode step of its bucket, from that step's own inputs: the warm-up runs
    before the capture really execute, and each writes the step's cache slots — so they must write
    exactly what the step writes (`run` then replays the same step: the same writes again)."""

    def __init__(self, engine: Engine, key: tuple[int, int], rows: list[_Row]):
        self.engine, (self.B, self.n) = engine, key
        self.buffers = _decode_inputs(rows, self.B, self.n, engine.device)
        self.pool_k = engine.pool.cache.k
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
        return self.engine._decode_step(*self.buffers)

    def run(self, rows: list[_Row]) -> torch.Tensor:
        """The step for `rows` (at most B of them): fill the buffers, replay, their logits."""
        for buf, value in zip(self.buffers, _decode_inputs(rows, self.B, self.n, self.engine.device)):
            buf.copy_(value)
        self._replay()
        for r in rows:
            r.length += 1
        return self.out[: len(rows)].clone()
