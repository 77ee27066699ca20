"""KV-cache generation: the same logits as a full forward at every step; sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmoe_jax import export
from rmoe_jax.generate import Generator, SamplingConfig, encode_prompt, sample_logits
from rmoe_jax.model import build_model

from helpers import random_params, small_model


@pytest.mark.parametrize("router,overrides", [
    ("recurrent", {"router.bias": True, "router.projector_bias": True}),
    ("linear", {"tie_embeddings": True}),
])
def test_cached_generation_matches_full_forward_at_every_step(router, overrides):
    cfg = small_model(router, **overrides)
    params = random_params(cfg, seed=1)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
    generator = Generator(cfg, SamplingConfig(temperature=1.0))
    new = 8
    tokens, step_logits = generator(params, prompt, new, seed=3, return_logits=True)
    assert tokens.shape == (2, 5 + new) and step_logits.shape == (2, new, cfg.vocab_size)
    np.testing.assert_array_equal(tokens[:, :5], prompt)
    assert generator.traces == {"prefill": 1, "step": 1}  # the decode step compiled once

    model = build_model(cfg)
    full = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, tokens[:, :-1])
    # Step t's logits predict token 5 + t from everything before it.
    np.testing.assert_allclose(step_logits, np.asarray(full)[:, 4:], atol=2e-5, rtol=1e-5)

    # Seeded: the same seed gives the same tokens, another seed (almost surely) others; a
    # second call of the same length reuses the compiled step.
    again = generator(params, prompt, new, seed=3)
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, generator(params, prompt, new, seed=4))
    assert generator.traces == {"prefill": 1, "step": 1}


def test_generation_refuses_to_run_past_max_seq_len():
    cfg = small_model("linear")  # max_seq_len 16
    generator = Generator(cfg, SamplingConfig(greedy=True))
    with pytest.raises(ValueError, match="max_seq_len"):
        generator(random_params(cfg), np.zeros((1, 10), np.int32), 7)


def test_sampling_rules():
    logits = jnp.asarray([[0.0, 3.0, 2.0, 1.0, -1.0]] * 2000, jnp.float32)
    key = jax.random.key(0)
    greedy = sample_logits(logits, key, SamplingConfig(greedy=True))
    assert set(np.asarray(greedy).tolist()) == {1}
    assert set(np.asarray(sample_logits(logits, key, SamplingConfig(temperature=0.0))).tolist()) == {1}
    top2 = np.asarray(sample_logits(logits, key, SamplingConfig(top_k=2)))
    assert set(top2.tolist()) == {1, 2}
    # probs 0.64, 0.24, 0.09, ...: top_p 0.7 keeps the first two, 0.5 only the first.
    assert set(np.asarray(sample_logits(logits, key, SamplingConfig(top_p=0.7))).tolist()) == {1, 2}
    assert set(np.asarray(sample_logits(logits, key, SamplingConfig(top_p=0.5))).tolist()) == {1}
    everything = np.asarray(sample_logits(logits, key, SamplingConfig(temperature=1.0)))
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(np.mean(everything == 1), np.exp(3) / np.exp(logits[0]).sum(), atol=0.04)
    hot = np.asarray(sample_logits(logits, key, SamplingConfig(temperature=100.0)))
    assert abs(np.mean(hot == 4) - 0.2) < 0.04  # nearly uniform
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0).check()


def test_prompts_start_like_documents():
    from rmoe_jax.data import ByteTokenizer

    assert encode_prompt(ByteTokenizer(), "ab").tolist() == [97, 98]
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(ByteTokenizer(), "")

    class WithBos(ByteTokenizer):
        bos_id = 2

    assert encode_prompt(WithBos(), "").tolist() == [2]
