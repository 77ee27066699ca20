"""Attribution of a traced step's time to parts of the model (`rmoe_jax/step_profile.py`),
on a hand-written HLO excerpt and trace, and on a real traced step."""

import jax
import jax.numpy as jnp
import pytest

from rmoe_jax import step_profile

HLO = """
ENTRY %main {
  %fusion.1 = f32[4,8]{1,0} fusion(%p0), kind=kLoop, metadata={op_name="jit(step)/jvp(MoETransformer)/while/body/closed_call/layers/attention/dot_general"}
  %fusion.2 = f32[4,8]{1,0} fusion(%p0), kind=kLoop, metadata={op_name="jit(step)/transpose(jvp(MoETransformer))/while/body/closed_call/layers/moe/router/dot_general"}
  %dot.3 = f32[4,8]{1,0} dot(%p0, %p1), metadata={op_name="jit(step)/transpose(jvp(MoETransformer))/while/body/closed_call/layers/moe/cond/dot_general"}
  %while.4 = (f32[4,8]) while(%t), metadata={op_name="jit(step)/jvp(MoETransformer)/while"}
  %add.5 = f32[4,8]{1,0} add(%a, %b), metadata={op_name="jit(step)/add"}
  ROOT %wrapped_broadcast.6 = f32[8,4,8]{2,1,0} fusion(%c), kind=kLoop
}
"""


def _event(name, ts, dur, tid=1):
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_parts_follow_the_op_names():
    names = step_profile.op_names(HLO)
    assert step_profile.part_of(names["fusion.1"]) == "attention (forward)"
    assert step_profile.part_of(names["fusion.2"]) == "router (backward)"
    assert step_profile.part_of(names["dot.3"]) == "experts + dispatch (backward)"
    assert step_profile.part_of(names["while.4"]) == "layer scan bookkeeping (forward)"
    assert step_profile.part_of(names["add.5"]) == step_profile.OUTSIDE
    assert step_profile.part_of(names["wrapped_broadcast.6"]) == step_profile.UNATTRIBUTED


def test_nested_events_count_once_and_other_events_are_ignored():
    names = step_profile.op_names(HLO)
    events = [
        _event("while.4", 0, 100),           # contains fusion.1 and dot.3: not counted itself
        _event("fusion.1", 10, 30),
        _event("ThreadpoolListener::Record", 12, 5),  # not an HLO instruction
        _event("dot.3", 50, 40),
        _event("fusion.2", 0, 20, tid=2),    # another thread, overlapping in time
        _event("add.5", 200, 10),
        _event("wrapped_broadcast.6", 220, 6),
    ]
    per_op = step_profile.op_seconds(events, names)
    seconds = step_profile.attribute(per_op, names)
    assert seconds == pytest.approx({"attention (forward)": 30e-6,
                                     "experts + dispatch (backward)": 40e-6,
                                     "router (backward)": 20e-6, step_profile.OUTSIDE: 10e-6,
                                     step_profile.UNATTRIBUTED: 6e-6})
    top = step_profile.top_ops(per_op, names, count=2)
    assert [(name, calls) for _, calls, name, _ in top] == [("dot.3", 1), ("fusion.1", 1)]
    table = step_profile.format_profile("rmoe", seconds, top)  # 40 of 106 microseconds
    assert "| experts + dispatch (backward) | 0.000 | 37.7% |" in table


def test_a_real_traced_step(tmp_path):
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    step = jax.jit(jax.grad(loss))
    w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
    compiled = step.lower(w, x).compile()
    compiled(w, x).block_until_ready()
    table = step_profile.profile_step(lambda: compiled(w, x).block_until_ready(), compiled.as_text(),
                                      str(tmp_path / "trace"), "toy")
    # Not a model: everything is outside it, and the time is positive.
    assert f"| {step_profile.OUTSIDE} |" in table
    assert list(tmp_path.glob("trace/**/perfetto_trace.json.gz"))
