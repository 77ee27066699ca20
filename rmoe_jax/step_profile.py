"""Where a compiled step's time goes: a `jax.profiler` trace, attributed to parts of the model.

    python -m rmoe_jax.bench --config configs/enwik8_medium.py --variants rmoe,smoe \
        --profile runs/profile      # + one traced step per variant, and this table per variant

The trace (`<dir>/<variant>/plugins/profile/*/perfetto_trace.json.gz`, for ui.perfetto.dev)
has one event per executed XLA operation (fusion, dot, copy ...) named as in the compiled HLO. Each HLO
instruction carries the `op_name` of the JAX operation it came from (`jit(step)/transpose(jvp(
MoETransformer))/while/body/closed_call/layers/attention/...`), so an event's time can be
charged to the module that produced it (attention, router, experts, norms, LM head, the layer
scan's own bookkeeping, or what runs outside the model: loss, gradient clipping, optimizer) and
to the forward or backward pass (`transpose(...)` is reverse-mode autodiff). Events nested in
another event (a while loop and its body) are counted once, at the innermost level.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Callable

# (part, substring of op_name) in priority order: the first match names the part.
PARTS = (
    ("router", "/moe/router"),
    ("router", "router_shared"),
    ("experts + dispatch", "/moe/"),
    ("attention", "/attention/"),
    ("norms", "_norm/"),
    ("embedding", "/embed/"),
    ("LM head", "/lm_head/"),
    ("dropout", "/Dropout_"),
    ("layer scan bookkeeping", "MoETransformer"),
)
OUTSIDE = "outside the model (loss, clipping, optimizer)"
UNATTRIBUTED = "unattributed (no op_name: buffer set-up)"

_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = ')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the `op_name` of the JAX operation it came from ('' if none)."""
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            names[match.group(1)] = op_name.group(1) if op_name else ""
    return names


def part_of(op_name: str) -> str:
    """'attention (backward)', 'router (forward)', ... for one op_name."""
    if not op_name:
        return UNATTRIBUTED
    if "MoETransformer" not in op_name:
        return OUTSIDE
    part = next(name for name, key in PARTS if key in op_name)
    return f"{part} ({'backward' if 'transpose(' in op_name else 'forward'})"


def leaf_events(events: list[dict]) -> list[dict]:
    """Complete ('X') events that contain no other of `events` on the same thread."""
    by_thread = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    leaves = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        for i, event in enumerate(thread_events):
            end = event["ts"] + event["dur"]
            nxt = thread_events[i + 1] if i + 1 < len(thread_events) else None
            if nxt is None or nxt["ts"] >= end:
                leaves.append(event)
    return leaves


def op_seconds(trace_events: list[dict], names: dict[str, str]) -> dict[str, tuple[float, int]]:
    """HLO instruction -> (seconds, calls), from the leaf events that are instructions of the
    step (`names`); a while loop's own event is dropped in favour of its body's."""
    totals: dict[str, tuple[float, int]] = {}
    for event in leaf_events([e for e in trace_events if e.get("name") in names]):
        seconds, calls = totals.get(event["name"], (0.0, 0))
        totals[event["name"]] = (seconds + event["dur"] / 1e6, calls + 1)
    return totals


def attribute(per_op: dict[str, tuple[float, int]], names: dict[str, str]) -> dict[str, float]:
    """Seconds per part of the model (`part_of`), from `op_seconds`."""
    seconds: dict[str, float] = collections.Counter()
    for name, (value, _) in per_op.items():
        seconds[part_of(names[name])] += value
    return dict(seconds)


def top_ops(per_op: dict[str, tuple[float, int]], names: dict[str, str], count: int = 10) -> list[tuple]:
    """The `count` costliest HLO instructions: (seconds, calls, name, part), largest first."""
    ranked = sorted(per_op.items(), key=lambda item: -item[1][0])[:count]
    return [(value, calls, name, part_of(names[name])) for name, (value, calls) in ranked]


def read_trace(directory: str) -> list[dict]:
    """The events of the newest Perfetto trace under `directory`."""
    files = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_step(run_one_step: Callable[[], None], hlo_text: str, directory: str,
                 name: str) -> str:
    """Trace one call of `run_one_step` (which must block until done) into `directory`;
    returns the Markdown tables of `format_profile`."""
    import jax

    with jax.profiler.trace(directory, create_perfetto_trace=True):
        run_one_step()
    names = op_names(hlo_text)
    per_op = op_seconds(read_trace(directory), names)
    return format_profile(name, attribute(per_op, names), top_ops(per_op, names))


def format_profile(name: str, seconds: dict[str, float], top: list[tuple] = ()) -> str:
    """Markdown: one variant's parts, largest first, with shares of the total; then `top`."""
    total = sum(seconds.values()) or 1.0
    lines = [f"Where one `{name}` step's time goes (sum of leaf XLA ops: {total:.3f} s; "
             "ops on both cores at once add up, so this can exceed the wall time):", "",
             "| part | s | share |", "|---|---:|---:|"]
    for part, value in sorted(seconds.items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {value:.3f} | {value / total:.1%} |")
    if top:
        lines += ["", "| costliest XLA ops | s | calls | part |", "|---|---:|---:|---|"]
        lines += [f"| `{op}` | {value:.3f} | {calls} | {part} |" for value, calls, op, part in top]
    return "\n".join(lines) + "\n"
