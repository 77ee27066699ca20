"""Sample text from a checkpoint or an export, with a KV cache.

    python -m rmoe_jax.generate --workdir runs/rmoe --prompt "ROMEO:" --max_new_tokens 200 \\
        [--temperature 0.8] [--top_k 40] [--top_p 0.95] [--greedy] [--seed 0] [--num_samples 2]
    python -m rmoe_jax.generate --export exports/rmoe --prompt "ROMEO:"

The prompt runs through the model once (prefill), filling a KV cache of fixed length
prompt + max_new_tokens; then each new token is one decode step through all layers (the RMoE
router recurrence runs across the layers of that one token, so it needs no state across time).
The decode step is compiled once per call, whatever max_new_tokens is. Sampling: logits /
temperature, then top-k, then top-p (nucleus) filtering; `--greedy` (or temperature 0) takes
the argmax. Seeded: the same seed gives the same text.

Generation never drops tokens: a model trained with `moe.dispatch='capacity'` decodes with the
dropless dispatch (same weights; capacity only matters when experts overflow in a batch).
SentencePiece prompts start with the tokenizer's BOS, as every training document does; the
byte tokenizer has none, so its prompt must not be empty. The total length must fit
`model.max_seq_len` (RoPE positions the model never saw are refused, not extrapolated).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rmoe_jax.model.decode import decode_model, extend, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False

    def check(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if problems:
            raise ValueError("; ".join(problems))


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens `[batch]` int32 from last-position logits `[batch, vocab]`."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy or sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep = before < sampling.top_p  # the smallest prefix whose mass reaches top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Jitted prefill and decode step for one model; reusable across calls.

    `traces` counts how often each function was traced (= compiled, in this process): the
    decode step is traced once per (batch, cache length), never per token.
    """

    def __init__(self, model_config: ml_collections.ConfigDict, sampling: SamplingConfig):
        sampling.check()
        model_config = ml_collections.ConfigDict(model_config.to_dict())
        model_config.moe.dispatch = "dropless"  # inference never drops tokens
        self.model_config = model_config
        self.model = decode_model(model_config)
        self.sampling = sampling
        self.traces = {"prefill": 0, "step": 0}

        def prefill(params, cache, tokens, key):
            self.traces["prefill"] += 1
            logits, cache = extend(self.model, params, cache, tokens)
            last = logits[:, -1]
            return sample_logits(last, key, sampling), last, cache

        def step(params, cache, token, key):
            self.traces["step"] += 1
            logits, cache = extend(self.model, params, cache, token[:, None])
            last = logits[:, -1]
            return sample_logits(last, key, sampling), last, cache

        self._prefill = jax.jit(prefill)
        self._step = jax.jit(step, donate_argnums=(1,))

    def __call__(self, params, prompt: np.ndarray, max_new_tokens: int, seed: int = 0,
                 return_logits: bool = False):
        """Continue `prompt` `[batch, P]` int by `max_new_tokens` tokens.

        Returns tokens `[batch, P + max_new_tokens]` (numpy int32) and, with `return_logits`,
        also the logits `[batch, max_new_tokens, vocab]` each new token was sampled from.
        """
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(f"the prompt must be [batch, length>0] tokens, got shape {prompt.shape}")
        if max_new_tokens <= 0:
            raise ValueError(f"--max_new_tokens must be > 0, got {max_new_tokens}")
        if prompt.min() < 0 or prompt.max() >= self.model_config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        batch, length = prompt.shape
        cache_len = length + max_new_tokens
        if cache_len > self.model_config.max_seq_len:
            raise ValueError(
                f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) = {cache_len} is "
                f"longer than the model's max_seq_len ({self.model_config.max_seq_len}); shorten "
                "the prompt or ask for fewer tokens")
        cache = init_cache(self.model, batch, cache_len)
        key = jax.random.key(seed)
        token, last, cache = self._prefill(params, cache, jnp.asarray(prompt),
                                           jax.random.fold_in(key, 0))
        tokens, logits = [token], [last]
        for t in range(1, max_new_tokens):
            token, last, cache = self._step(params, cache, token, jax.random.fold_in(key, t))
            tokens.append(token)
            if return_logits:
                logits.append(last)
        out = np.concatenate([prompt, np.stack(jax.device_get(tokens), axis=1)], axis=1)
        if return_logits:
            return out, np.stack(jax.device_get(logits), axis=1)
        return out


def generate(model_config: ml_collections.ConfigDict, params, prompt, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             return_logits: bool = False):
    """One-shot `Generator(model_config, sampling)(params, prompt, max_new_tokens, seed)`."""
    return Generator(model_config, sampling)(jax.device_put(params), prompt, max_new_tokens,
                                             seed=seed, return_logits=return_logits)


def encode_prompt(tokenizer, text: str) -> np.ndarray:
    """Token ids of the prompt, starting with BOS when the tokenizer separates documents."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if tokenizer.bos_id is not None:
        ids = np.concatenate([np.array([tokenizer.bos_id], np.int32), ids])
    if ids.size == 0:
        raise ValueError("the prompt is empty; the byte tokenizer has no start token, so give "
                         "at least one character")
    return ids


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rmoe_jax.generate",
                                     description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (train.py --workdir)")
    source.add_argument("--export", help="export folder (python -m rmoe_jax.export --out)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="keep the smallest set of tokens with this much probability (1: off)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1, help="continuations (one batch)")
    parser.add_argument("--data_dir", default=None,
                        help="override the run's data.data_dir (where its SentencePiece model is)")
    args = parser.parse_args(argv)

    from rmoe_jax.checkpoint import _quiet_logs
    from rmoe_jax.config import ConfigError
    from rmoe_jax.data import make_tokenizer
    from rmoe_jax.data.errors import DataNotPreparedError
    from rmoe_jax.evaluate import load_model

    _quiet_logs()
    try:
        if args.num_samples <= 0:
            raise ValueError(f"--num_samples must be > 0, got {args.num_samples}")
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.greedy)
        sampling.check()
        loaded = load_model(args.workdir, args.export, args.step)
        data_config = loaded.data_config
        if data_config is None:
            data_config = ml_collections.ConfigDict({"tokenizer": "byte"})
        if args.data_dir is not None:
            data_config.data_dir = args.data_dir
        tokenizer = make_tokenizer(data_config)
        prompt = encode_prompt(tokenizer, args.prompt)
        start = time.time()
        tokens = generate(loaded.model_config, loaded.params,
                          np.tile(prompt[None], (args.num_samples, 1)),
                          max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    except (ValueError, FileNotFoundError, ConfigError, DataNotPreparedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.time() - start
    for i, row in enumerate(tokens):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tokenizer.decode(row[len(prompt):]))
    print(f"[{args.num_samples} x {args.max_new_tokens} tokens in {seconds:.1f}s, "
          f"compile included]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
