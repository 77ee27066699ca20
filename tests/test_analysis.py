"""The routing analyses (rmoe_jax.analysis) against NumPy / sklearn references on hand-made
router outputs with known answers, and against the model's own routing statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from rmoe_jax import analysis
from rmoe_jax.model import build_model
from tests.helpers import small_model


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def sklearn_mi_matrix(probs, bins=100):
    """The paper's procedure, literally: per token, bin both layers' E probabilities, sklearn MI."""
    num_layers, num_tokens, _ = probs.shape
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    labels = np.digitize(probs, edges)
    out = np.zeros((num_layers, num_layers))
    for i in range(num_layers):
        for j in range(num_layers):
            out[i, j] = np.mean([mutual_info_score(labels[i, n], labels[j, n]) for n in range(num_tokens)])
    return out


# -- mutual information ---------------------------------------------------------------------------

def test_binning_matches_digitize_on_fixed_edges():
    p = np.array([0.0, 0.004, 0.01, 0.0100001, 0.5, 0.999, 1.0])
    edges = np.linspace(0.0, 1.0, 101)[1:-1]
    np.testing.assert_array_equal(analysis.bin_probabilities(p), np.digitize(p, edges))


@pytest.mark.parametrize("num", [2, 5, 16])
def test_token_mi_matches_sklearn(num):
    rng = np.random.default_rng(num)
    a = rng.integers(0, 4, size=(50, num))
    b = np.where(rng.random((50, num)) < 0.5, a, rng.integers(0, 4, size=(50, num)))
    ours = analysis.token_mutual_information(a, b)
    ref = [mutual_info_score(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_mi_matrix_matches_sklearn_reference_on_random_routing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 60, 8)) * np.array([0.5, 2.0, 4.0, 1.0])[:, None, None]
    logits[2] += logits[1]  # correlate two layers
    probs = softmax(logits)
    np.testing.assert_allclose(analysis.mutual_information_matrix(probs, chunk=16),
                               sklearn_mi_matrix(probs), atol=1e-10)


def test_identical_layers_reach_the_maximum_mi():
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(1, 40, 16)) * 3)
    other = softmax(rng.normal(size=(1, 40, 16)) * 3)
    mi = analysis.mutual_information_matrix(np.concatenate([probs, probs, other]))
    # identical layers: MI(a, a) = H(binned a), the largest any layer can share with a
    assert mi[0, 1] == pytest.approx(mi[0, 0])
    assert mi[0, 1] > 1.0
    assert mi[0, 2] <= mi[0, 0] + 1e-12
    np.testing.assert_allclose(mi, mi.T)


def test_independent_layers_have_near_zero_mi():
    # 256 experts whose probabilities take one of two values (two bins) independently per layer:
    # the binned labels are independent coin flips, so the MI is only finite-sample bias.
    rng = np.random.default_rng(2)
    high = rng.random((2, 200, 256)) < 0.5
    probs = np.where(high, 0.0125, 0.002)  # bins 1 and 0
    mi = analysis.mutual_information_matrix(probs)
    assert mi[0, 0] == pytest.approx(np.mean([mutual_info_score(h, h) for h in high[0]]))
    assert mi[0, 0] > 0.6  # ~ln 2
    assert mi[0, 1] < 0.01


def test_uniform_routing_has_zero_mi():
    probs = np.full((3, 10, 8), 1 / 8)
    np.testing.assert_array_equal(analysis.mutual_information_matrix(probs), 0.0)


# -- entropy, balance, load -----------------------------------------------------------------------

def test_gate_entropy_known_values_and_reference():
    uniform = np.full((1, 5, 16), 1 / 16)
    one_hot = np.zeros((1, 5, 16))
    one_hot[..., 3] = 1.0
    ent = analysis.gate_entropy(np.concatenate([uniform, one_hot]))
    np.testing.assert_allclose(ent, [math.log(16), 0.0], atol=1e-12)
    probs = softmax(np.random.default_rng(3).normal(size=(2, 30, 8)))
    ref = [np.mean([-np.sum(p * np.log(p)) for p in layer]) for layer in probs]
    np.testing.assert_allclose(analysis.gate_entropy(probs), ref, rtol=1e-12)


def test_inner_and_outer_balance_hand_values():
    token = np.array([0.5, 0.25, 0.125, 0.125])
    probs = np.stack([np.stack([token, token[[1, 0, 2, 3]], np.full(4, 0.25)])])  # [1, 3, 4]
    assert analysis.inner_balance(probs)[0] == pytest.approx(2.0)  # median of 2, 2, 1
    assert analysis.outer_balance(probs, 2)[0] == pytest.approx((0.75 + 0.75 + 0.5) / 3)
    assert analysis.outer_balance(probs, 1)[0] == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def test_expert_load_counts_top_k_slots():
    probs = np.array([[[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.4, 0.0]]])
    load = analysis.expert_load(probs, 2)  # slots: {0,1}, {3,2}, {0,2}
    np.testing.assert_allclose(load, [[2 / 6, 1 / 6, 2 / 6, 1 / 6]])
    np.testing.assert_allclose(load.sum(-1), 1.0)


def test_capacity_drop_ratio_hand_example():
    # 8 tokens, every token's 1st choice expert 0 and 2nd choice expert 1; E=4, k=2, cf=1 gives
    # capacity ceil(2*8/4) = 4: four tokens of each expert are kept, half the slots dropped.
    probs = np.tile(np.array([0.6, 0.3, 0.05, 0.05]), (1, 8, 1))
    assert analysis.capacity(8, 4, 2, 1.0) == 4
    np.testing.assert_allclose(analysis.capacity_drop_ratio(probs, 2, seq_len=8, capacity_factor=1.0), [0.5])
    np.testing.assert_allclose(analysis.capacity_drop_ratio(probs, 2, seq_len=8, capacity_factor=2.0), [0.0])


def test_capacity_drop_ratio_matches_the_models_capacity_dispatch():
    from rmoe_jax.model.moe import capacity_dispatch

    rng = np.random.default_rng(4)
    num, top_k, groups, seq = 4, 2, 3, 10
    probs = softmax(rng.normal(size=(groups * seq, num)) * 2)
    weights, indices = jax.lax.top_k(jnp.asarray(probs), top_k)
    experts = tuple(jnp.zeros(s) for s in ((num, 2, 3), (num, 2, 3), (num, 3, 2)))
    for cf in (0.5, 1.0, 1.5):
        cap = analysis.capacity(seq, num, top_k, cf)
        _, kept = capacity_dispatch(jnp.zeros((groups, seq, 2)), weights.reshape(groups, seq, top_k),
                                    indices.reshape(groups, seq, top_k), experts, cap)
        ours = analysis.capacity_drop_ratio(probs[None], top_k, seq_len=seq, capacity_factor=cf)
        assert ours[0] == pytest.approx(1.0 - float(np.mean(kept)))


# -- expert similarity ----------------------------------------------------------------------------

def reference_similarity(w1, w3, w2):
    """Literal loop: average over f, L2-normalise each, concatenate, full Gram mean (/ 3)."""
    num = w1.shape[0]
    sigs = []
    for e in range(num):
        parts = [w1[e].mean(1), w3[e].mean(1), w2[e].mean(0)]
        sigs.append(np.concatenate([p / np.linalg.norm(p) for p in parts]))
    gram = np.array([[sigs[a] @ sigs[b] for b in range(num)] for a in range(num)])
    return gram.mean() / 3


def test_expert_similarity_against_reference_and_known_cases():
    rng = np.random.default_rng(5)
    w1, w3 = rng.normal(size=(2, 2, 6, 5, 7))
    w2 = rng.normal(size=(2, 6, 7, 5))
    sim = analysis.expert_similarity({"w1": w1, "w3": w3, "w2": w2})
    np.testing.assert_allclose(sim, [reference_similarity(w1[i], w3[i], w2[i]) for i in range(2)])
    same = np.broadcast_to(w1[0, :1], w1[0].shape)
    assert analysis.expert_similarity({"w1": same[None], "w3": same[None],
                                       "w2": np.broadcast_to(w2[0, :1], w2[0].shape)[None]})[0] == pytest.approx(1.0)
    # orthogonal expert signatures: only the diagonal counts, mean = 1 / E
    eye = np.eye(4)[:, :, None] * np.ones((1, 1, 3))  # expert e's mean over f is the unit vector e
    orth = analysis.expert_similarity({"w1": eye[None], "w3": eye[None], "w2": eye.transpose(0, 2, 1)[None]})
    assert orth[0] == pytest.approx(1 / 4)


# -- on the model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    config = small_model("recurrent")
    model = build_model(config)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, config.vocab_size)
    params = model.init(jax.random.key(0), tokens)["params"]
    batch = {"inputs": np.asarray(tokens), "targets": np.roll(np.asarray(tokens), -1, axis=1),
             "weights": np.ones((4, 16), np.float32)}
    return config, model, params, batch


def test_recorded_routing_matches_the_models_own_statistics(tiny_model):
    config, model, params, batch = tiny_model
    rec = analysis.record_routing(model, params, [batch])
    probs = rec["probs"]
    assert probs.shape == (config.num_layers, 4 * 16, config.moe.num_experts)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    stats = rec["stats"]
    np.testing.assert_allclose(analysis.gate_entropy(probs), stats["gate_entropy"], rtol=1e-5)
    np.testing.assert_allclose(analysis.inner_balance(probs), stats["top1_top2_ratio"], rtol=1e-5)
    np.testing.assert_allclose(analysis.outer_balance(probs, config.moe.top_k), stats["topk_weight_sum"],
                               rtol=1e-5)
    np.testing.assert_allclose(analysis.expert_load(probs, config.moe.top_k), stats["expert_load"], atol=1e-6)
    summary = analysis.summarize_routing(probs, config.moe.top_k, seq_len=16, capacity_factor=1.0)
    assert len(summary["mutual_information"]["matrix"]) == config.num_layers
    assert 0.0 <= summary["drop_ratio"]["mean"] < 1.0


def test_router_grad_norm_split(tiny_model):
    config, model, params, batch = tiny_model
    g = analysis.router_grad_norms(model, params, batch, balance_coef=0.01)
    g0 = analysis.router_grad_norms(model, params, batch, balance_coef=0.0)
    assert g["lm"] > 0 and g["balance"] > 0
    assert g0["balance"] == 0.0
    assert g0["lm"] == pytest.approx(g["lm"], rel=1e-6)
    assert len(g["lm_per_layer"]) == config.num_layers
    # the LM part is the norm of d(CE)/d(router params) and nothing else
    import optax

    def ce(p):
        logits, _ = model.apply({"params": p}, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    grads = jax.grad(ce)(params)
    router = [grads["layers"]["moe"]["router"], grads["router_shared"]]
    ref = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(router)))
    assert g["lm"] == pytest.approx(ref, rel=1e-4)
