"""What `tokprof rollup` prints: the analytic card (before any measurement), the points table, and one JSON line.

The analytic card is the ceiling a reader should hold the results against: at batch 1 every decode step reads all
the weights once plus the KV cache of its context, so no kernel can beat

    tokens/s (batch 1) <= HBM bandwidth / (decode weight bytes + KV bytes per token x context)

on that GPU's datasheet, and the largest batch that fits in its memory at each context (tokprof.rollup.capacity,
for tp 1, 2, 4, 8). The table then gives the roll-up points, each with its provenance; at tp > 1 a second
table splits each point's per-GPU step into kernels and collectives (the all-reduce share of the step).
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokprof.models.config import ModelConfig
from tokprof.models.tp import check_tp
from tokprof.profiler.devices import GpuSpec
from tokprof.quant.precision import parse_precision
from tokprof.reports.document import num, num_bytes
from tokprof.rollup.capacity import DEFAULT_MEMORY_UTILIZATION, max_batch
from tokprof.rollup.pareto import InteractivityCost
from tokprof.rollup.records import RollupPoint


def analytic_card(config: ModelConfig, spec: GpuSpec | None, contexts: list[int], dtype: str,
                  tp: int = 1, *, capacity_bytes: int | None = None,
                  memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, ep: int = 1,
                  dp_attention: bool = False) -> dict[str, Any]:
    """Weight bytes, KV bytes per token, the batch-1 bandwidth bound per context and the largest batch that fits
    in memory at each context for each tensor-parallel degree that shards the model (1, 2, 4, 8 and `tp`)
    (modelled, from specs; `capacity_bytes` a device's own memory instead of the spec table's).

    tp > 1 adds the linear-weight bytes one GPU of the group reads per step (the bound stays a single GPU's)."""
    precision = parse_precision(dtype)  # a float dtype or a low-precision label: bytes by format
    weights = config.decode_weight_bytes(precision.label, batch=1)  # MoE: the k experts one token takes
    kv = config.kv_bytes_per_token(precision.label)
    card: dict[str, Any] = {
        "model": config.name, "dtype": precision.label, "params": config.num_params(),
        "active_params": config.active_params(),
        "weight_format": precision.weight_format, "kv_dtype": precision.kv_dtype or precision.activation,
        "weight_bytes": config.weight_bytes(precision.label), "decode_weight_bytes": weights,
        "kv_bytes_per_token": kv, "kv_lora_rank": config.kv_lora_rank, "gpu": spec.key if spec is not None else None,
        "hbm_tbps": spec.hbm_tbps if spec is not None else None, "provenance": "modelled", "batch1": [],
    }
    from tokprof.models.plan import _is_moe_family

    if _is_moe_family(config) and (tp > 1 or ep > 1 or dp_attention):
        from tokprof.rollup.capacity import weight_bytes_per_gpu as held_per_gpu

        card["tp"], card["ep"], card["dp_attention"] = tp, ep, dp_attention
        card["weight_bytes_per_gpu"] = held_per_gpu(config, precision.label, tp, ep=ep, dp_attention=dp_attention)
    elif tp > 1:
        from tokprof.models.tp import tp_decode_calls, weight_bytes_per_gpu

        card["tp"] = tp
        card["linear_weight_bytes_per_gpu"] = weight_bytes_per_gpu(tp_decode_calls(config, 1, 1, dtype, tp))
    card["max_batch"], card["max_batch_reason"] = _max_batches(config, spec, contexts, dtype, tp, capacity_bytes,
                                                              memory_utilization, ep, dp_attention)
    if spec is None or spec.hbm_tbps is None:
        card["batch1_reason"] = "no datasheet HBM bandwidth for this device (a CPU or an unknown GPU)"
        return card
    card["spec_source"] = f"{spec.source} ({spec.date})"
    for context in contexts:
        step_bytes = weights + config.kv_bytes_per_sequence(precision.label, context)  # sliding layers: the window
        card["batch1"].append({"context": context, "bytes_per_step": step_bytes,
                               "tokens_per_s_max": spec.hbm_tbps * 1e12 / step_bytes})
    return card


def _max_batches(config: ModelConfig, spec: GpuSpec | None, contexts: list[int], dtype: str, tp: int,
                 capacity_bytes: int | None, memory_utilization: float, ep: int = 1,
                 dp_attention: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """The largest batch that fits per (tp, context), and at the asked (tp, ep, dp_attention) of an MoE model;
    ([], reason) when the memory is unknown (a CPU)."""
    if capacity_bytes is None and (spec is None or spec.memory_gb is None):
        return [], "no memory figure for this device (a CPU, or a GPU without memory_gb in the spec table)"
    rows = []
    for t in sorted({1, 2, 4, 8, tp}):
        try:
            check_tp(config, t)
        except ValueError:
            continue  # this tp does not shard the model
        for context in contexts:
            limit = max_batch(config, spec, context, dtype, t, capacity_bytes=capacity_bytes,
                              memory_utilization=memory_utilization)
            rows.append({"tp": t, "context": context, "batch": limit.batch, "reason": limit.reason,
                         "weights_bytes_per_gpu": limit.budget.weights_bytes,
                         "capacity_bytes": limit.budget.capacity_bytes,
                         "memory_utilization": memory_utilization})
    if ep > 1:  # the asked expert-parallel layout (batch per GPU with dp_attention)
        for context in contexts:
            limit = max_batch(config, spec, context, dtype, tp, capacity_bytes=capacity_bytes,
                              memory_utilization=memory_utilization, ep=ep, dp_attention=dp_attention)
            rows.append({"tp": tp, "ep": ep, "dp_attention": dp_attention, "context": context, "batch": limit.batch,
                         "reason": limit.reason, "weights_bytes_per_gpu": limit.budget.weights_bytes,
                         "capacity_bytes": limit.budget.capacity_bytes, "memory_utilization": memory_utilization})
    return rows, None


def _layout(r: dict[str, Any]) -> str:
    """"tp 8", "tp 8 ep 8", "ep 8 dp-attention": a max_batch row's parallel layout."""
    if r.get("ep", 1) > 1:
        return f"ep {r['ep']} dp-attention" if r.get("dp_attention") else f"tp {r['tp']} ep {r['ep']}"
    return f"tp {r['tp']}"


def _gb(n: float) -> str:
    return f"{num(n / 1e9)} GB" if n >= 1e9 else f"{num(n / 1e6)} MB"


def _count_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def print_card(console: Console, card: dict[str, Any]) -> None:
    console.print(f"[bold]{escape(str(card['model']))}[/] ({escape(str(card['dtype']))}): "
                  f"{_count_params(card['params'])} parameters, "
                  f"weights {_gb(card['weight_bytes'])}, read per decode step {_gb(card['decode_weight_bytes'])}; "
                  f"KV cache {num_bytes(card['kv_bytes_per_token'])} per token")
    if card.get("weight_format"):
        from tokprof.quant.formats import WEIGHT_FORMATS

        fmt = WEIGHT_FORMATS[card["weight_format"]]
        console.print(f"layer linears in {fmt.name} ({fmt.bits_per_weight():.2f} bits per weight with scales; "
                      f"{fmt.description}); embedding and LM head in the activation dtype; KV cache "
                      f"{card['kv_dtype']}")
    elif card.get("kv_dtype") == "fp8":
        console.print("KV cache fp8 (e4m3, per-head scales)")
    if card.get("weight_bytes_per_gpu") is not None:
        layout = _layout({"tp": card["tp"], "ep": card["ep"], "dp_attention": card["dp_attention"]})
        mla = (" (MLA's latent KV cache is one head: replicated whole on every tensor-parallel GPU)"
               if card["tp"] > 1 and card.get("kv_lora_rank") else "")
        console.print(f"{layout}: each GPU holds {_gb(card['weight_bytes_per_gpu'])} of weights (routed experts / "
                      f"{card['ep'] if card['ep'] > 1 else card['tp']}){mla}; the bound below is one GPU's")
    elif card.get("tp"):
        console.print(f"tensor parallel over {card['tp']} GPUs: each reads {_gb(card['linear_weight_bytes_per_gpu'])} "
                      "of linear weights per step and pays 2 all-reduces per layer; the bound below is one GPU's")
    _print_max_batch(console, card)
    if not card["batch1"]:
        console.print(f"batch-1 bandwidth bound: unknown ({escape(str(card.get('batch1_reason')))})")
        return
    bounds = ", ".join(f"{num(b['tokens_per_s_max'])} tokens/s at context {b['context']}" for b in card["batch1"])
    console.print(f"batch-1 bound on the {escape(str(card['gpu']))} datasheet ({card['hbm_tbps']} TB/s, modelled): "
                  f"{bounds}")


def _print_max_batch(console: Console, card: dict[str, Any]) -> None:
    rows = card.get("max_batch") or []
    if not rows:
        if card.get("max_batch_reason"):
            console.print(f"largest batch that fits: unknown ({escape(str(card['max_batch_reason']))})")
        return
    first = rows[0]
    head = (f"largest batch that fits in {_gb(first['capacity_bytes'])} per GPU "
            f"({first['memory_utilization']:.0%} usable, paged KV cache; modelled):")
    parts = []
    for t in dict.fromkeys(_layout(r) for r in rows):
        cells = ", ".join(f"{r['batch']} at context {r['context']}" if r["batch"] is not None
                          else f"none at context {r['context']}" for r in rows if _layout(r) == t)
        parts.append(f"{t}: {cells}")
    console.print(head + " " + "; ".join(parts))
    asked = _layout({"tp": card.get("tp") or 1, "ep": card.get("ep", 1), "dp_attention": card.get("dp_attention")})
    for want in dict.fromkeys((_layout(first), asked)):
        for r in rows:
            if r["batch"] is None and _layout(r) == want:
                console.print(f"[dim]{want}, context {r['context']}: {escape(str(r['reason']))}[/]")
                break


def _fmt(x: float | None, spec: str = "") -> str:
    """One number format for every table (reports/document.num); `spec` is kept for the callers' reading."""
    return "-" if x is None else num(x)


def _count(x: float | None) -> str:
    return "-" if x is None else num(x)


def print_points(console: Console, points: list[RollupPoint], title: str) -> None:
    # two-line headers and no vertical rules keep the 8 columns inside the 80 columns rich gives a pipe
    table = Table(title=escape(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for col in ("batch", "context", "tokens/s\nper GPU", "tokens/s\nper user", "J/token", "$ per M\ntokens",
                "tokens/s\nper MW", "provenance"):
        table.add_column(col, justify="left" if col == "provenance" else "right", no_wrap=True)
    for p in points:
        if p.infeasible_reason is not None:  # never a number: the reason follows the table
            table.add_row(str(p.batch), str(p.context), "no fit", "-", "-", "-", "-", "infeasible")
            continue
        table.add_row(str(p.batch), str(p.context), _count(p.tokens_per_s_per_gpu), _count(p.tokens_per_s_per_user),
                      _fmt(p.j_per_token_total, ".3g"), _fmt(p.usd_per_million_tokens, ".4g"),
                      _count(p.tokens_per_s_per_mw), escape(p.provenance))
    console.print(table)
    for p in points:
        if p.infeasible_reason is not None:
            console.print(f"[yellow]batch {p.batch}, context {p.context}: does not fit in memory, "
                          f"{escape(p.infeasible_reason)}[/]")
    first = next((p for p in points if p.infeasible_reason is None), None)
    if first is not None:
        console.print(f"price: {first.usd_per_gpu_hour if first.usd_per_gpu_hour is not None else '-'} $/GPU-h "
                      f"({escape(first.price_source or 'none')}); power: {first.all_in_kw_per_gpu or '-'} kW per GPU "
                      f"all-in ({escape(first.power_source or 'none')})")
        for note in dict.fromkeys(n for p in points for n in p.notes):
            console.print(f"[dim]note: {escape(note)}[/]")
        reasons = {p.energy_reason for p in points if p.energy_reason and p.infeasible_reason is None}
        if len(reasons) == 1:
            console.print(f"[dim]J/token: {escape(reasons.pop())}[/]")


def print_interconnect(console: Console, points: list[RollupPoint]) -> None:
    """At tp > 1: each point's per-GPU step split into kernels and collectives, with the all-reduce share."""
    tp_points = [p for p in points if p.tp > 1 and p.step_time_us is not None]
    if not tp_points:
        return
    table = Table(title="interconnect: per-GPU step = kernels + collectives", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    for col in ("batch", "context", "tp", "step us", "kernels\nus", "collect-\nives us", "all-reduce\nshare",
                "collectives"):
        table.add_column(col, justify="left" if col == "collectives" else "right", no_wrap=True)
    for p in tp_points:
        all_reduce_us = sum(o.total_us for o in p.ops if o.op == "all_reduce")
        known = p.collective_time_us is not None
        table.add_row(str(p.batch), str(p.context), str(p.tp), f"{p.step_time_us:,.1f}",
                      _fmt(p.kernel_time_us, ",.1f"), _fmt(p.collective_time_us, ",.1f"),
                      f"{all_reduce_us / p.step_time_us:.1%}" if known else "-",
                      p.collective_provenance if known else "unknown")
    console.print(table)
    overheads = [p for p in tp_points if p.overhead_time_us]
    if overheads:
        console.print(f"[dim]step us = kernels + collectives + the step model's per-step overhead "
                      f"({', '.join(f'{p.overhead_time_us:,.0f}' for p in overheads)} us: overhead_time_us)[/]")
    for reason in dict.fromkeys(p.collective_reason for p in tp_points if p.collective_reason):
        console.print(f"[yellow]collective time unknown: {reason}[/]")


def print_interactivity(console: Console, costs: list[InteractivityCost]) -> None:
    for c in costs:
        if c.tokens_per_s_per_gpu is None:
            console.print(f"at {c.target_tokens_per_s_per_user:g} tokens/s per user, context {c.context}: {c.reason}")
            continue
        cost = f"${num(c.usd_per_million_tokens)} per M tokens" if c.usd_per_million_tokens is not None else c.reason
        console.print(f"at {c.target_tokens_per_s_per_user:g} tokens/s per user, context {c.context}: "
                      f"{num(c.tokens_per_s_per_gpu)} tokens/s per GPU, {cost} ({c.provenance}, "
                      f"between batch {' and '.join(map(str, c.between))})")


def summary(card: dict[str, Any], points: list[RollupPoint], **extra: Any) -> dict[str, Any]:
    """The JSON document of the last stdout line: the card, and every point without its per-op breakdown."""
    rows = []
    for p in points:
        d = p.to_dict()
        d.pop("ops")
        rows.append(d)
    return {**extra, "card": card, "points": rows}
