"""CUDA graphs for the server's decode-only steps, padded to captured batch sizes (as vLLM and SGLang do).

    runner = ModelRunner(model, num_blocks, scratch_blocks=1)      # one block more: the padded rows' KV lands there
    runner.graphs = DecodeGraphs(runner, max_batch=16, max_blocks=num_blocks)   # captures one graph per size
    runner.execute(plan)   # a decode-only step of n rows replays the graph of the smallest captured size >= n

Why: a decode step of a small model on a GPU is a few hundred kernel launches of a few microseconds each, so the
host's launch time, not the GPU, sets the step time when run eagerly. A captured graph replays them all in one
launch. A graph has static shapes and addresses, so each step's inputs are copied into static buffers (token ids,
positions, KV slots, block table, sequence lengths) and the batch is padded up to a captured size with dummy rows:
token 0 at position 0, one KV token in a scratch block outside the scheduler's pool, sampled and thrown away. Steps
with prefill chunks run eagerly (their token count varies too much to capture).

The padded forward is the same code whether captured or not: `capture=False` runs it eagerly, which is how the CPU
tests check the padding (outputs token-identical to `Transformer.generate`). The torch reference backend reads
sequence lengths on the host and cannot be captured; graphs need --backend triton or cuda.
"""

from __future__ import annotations

from typing import Any

import torch

from tokprof.kernels import decode_attention, embedding
from tokprof.kernels._common import skip_value_checks

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Static decode buffers for up to `max_batch` rows of up to `max_blocks` KV blocks, and per captured size a
    CUDA graph of the padded decode forward (`capture=True`, CUDA only) or the same forward run eagerly."""

    def __init__(self, runner: Any, *, max_batch: int, max_blocks: int, sizes: tuple[int, ...] = CAPTURE_SIZES,
                 capture: bool = True) -> None:
        model = runner.model
        for name, value in (("max_batch", max_batch), ("max_blocks", max_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if runner.scratch_block is None:
            raise ValueError("runner: padded decode rows need a scratch block; build it with "
                             "ModelRunner(model, num_blocks, scratch_blocks=1)")
        if capture and model.device.type != "cuda":
            raise RuntimeError(f"graphs: CUDA graphs need a CUDA device, the model is on {model.device}; serve "
                               "eagerly on the CPU")
        if capture and model.backend == "torch":
            raise ValueError("backend: the torch reference reads sequence lengths on the host and cannot be "
                             "captured in a CUDA graph; serve with --backend triton or cuda, or without graphs")
        self.runner, self.capture = runner, capture
        self.sizes = sorted({s for s in sizes if s < max_batch} | {max_batch})
        dev, bs = model.device, model.block_size
        b = self.sizes[-1]
        self.scratch_slot = runner.scratch_block * bs
        self.ids = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)  # (B,)
        self.slots = torch.full((b,), self.scratch_slot, dtype=torch.int64, device=dev)  # (B,)
        self.table = torch.full((b, max_blocks), runner.scratch_block, dtype=torch.int32, device=dev)  # (B, W)
        self.lens = torch.ones(b, dtype=torch.int32, device=dev)  # (B,)
        self.max_blocks = max_blocks
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def padded_size(self, n: int) -> int | None:
        """The smallest captured size >= n rows; None past the largest."""
        return next((s for s in self.sizes if s >= n), None)

    def _forward(self, b: int) -> torch.Tensor:
        """The padded decode forward over the first `b` rows of the buffers: tokens (b,) int64."""
        model = self.runner.model
        cfg, be = model.config, model.backend
        hq, d = cfg.num_heads, cfg.head_dim
        table, lens = self.table[:b], self.lens[:b]
        cache = self.runner.cache

        def attend(index: int, q: torch.Tensor, _k: torch.Tensor, _v: torch.Tensor) -> torch.Tensor:
            out = decode_attention(q.contiguous(), cache.k[index], cache.v[index], table, lens, backend=be)
            return out.reshape(b, hq * d)  # (b, Hq * D)

        x = embedding(self.ids[:b], model.weights.embed, backend=be)  # (b, H)
        residual = None
        for index in range(cfg.num_layers):
            x, residual = model._layer(index, x, residual, self.positions[:b], self.slots[:b], attend)
        tokens, _ = model._head(x, residual)  # (b,)
        return tokens

    def _capture_all(self) -> None:
        from tokprof.profiler.graphs import restore_stream

        model = self.runner.model
        prev, model.cache = model.cache, self.runner.cache
        try:
            with torch.no_grad(), skip_value_checks():
                side = torch.cuda.Stream(device=model.device)
                side.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(side):  # warm-up (compile, autotune) on a side stream, as torch requires
                    for b in self.sizes:
                        self._forward(b)
                stream = torch.cuda.current_stream(model.device)
                stream.wait_stream(side)
                pool = torch.cuda.graph_pool_handle()  # one memory pool for every size, the largest captured first
                for b in reversed(self.sizes):
                    graph = torch.cuda.CUDAGraph()
                    try:
                        with torch.cuda.graph(graph, pool=pool):
                            self.outputs[b] = self._forward(b)
                    finally:
                        restore_stream(stream)
                    self.graphs[b] = graph
        finally:
            model.cache = prev

    def _fill(self, plan: Any, b: int) -> None:
        """The plan's decode rows into the first rows of the buffers, dummy rows (scratch block) after them."""
        bs = self.runner.model.block_size
        rows = plan.decodes
        n = len(rows)
        width = max(len(c.request.blocks) for c in rows)
        if width > self.max_blocks:
            raise RuntimeError(f"graphs: a request holds {width} KV blocks, the captured table {self.max_blocks}")
        ids, pos, slots, lens = [], [], [], []
        table = torch.full((b, width), self.runner.scratch_block, dtype=torch.int32)
        for i, c in enumerate(rows):
            p = c.start
            ids.append(c.request.tokens[p])
            pos.append(p)
            slots.append(c.request.blocks[p // bs] * bs + p % bs)
            lens.append(p + 1)
            table[i, :len(c.request.blocks)] = torch.tensor(c.request.blocks, dtype=torch.int32)
        pad = b - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.scratch_slot] * pad
        lens += [1] * pad
        self.ids[:b].copy_(torch.tensor(ids, dtype=torch.int64))
        self.positions[:b].copy_(torch.tensor(pos, dtype=torch.int64))
        self.slots[:b].copy_(torch.tensor(slots, dtype=torch.int64))
        self.lens[:b].copy_(torch.tensor(lens, dtype=torch.int32))
        self.table[:b, :width].copy_(table)
        self.table[:b, width:].fill_(self.runner.scratch_block)

    def run(self, plan: Any) -> dict[int, int] | None:
        """A decode-only step through the padded buffers: request_id -> sampled token; None when the step has
        prefill chunks or more rows than the largest size (run it eagerly)."""
        if plan.prefills or not plan.decodes:
            return None
        b = self.padded_size(len(plan.decodes))
        if b is None:
            return None
        self._fill(plan, b)
        if self.capture:
            self.graphs[b].replay()
            tokens = self.outputs[b]
        else:
            model = self.runner.model
            prev, model.cache = model.cache, self.runner.cache
            try:
                with torch.no_grad(), skip_value_checks():
                    tokens = self._forward(b)
            finally:
                model.cache = prev
        got = tokens[:len(plan.decodes)].tolist()
        return {c.request.request_id: t for c, t in zip(plan.decodes, got, strict=True)}
