"""NumPy references written from the paper's equations (independent of the JAX code)."""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gates(p, name, count):
    width = p[name].shape[-1] // count
    return [p[name][..., k * width:(k + 1) * width] for k in range(count)]


def gru(p, x, h):
    """PyTorch GRUCell: r, z, n gates; b_hn inside the reset product."""
    (wir, wiz, win), (whr, whz, whn) = _gates(p, "input_kernel", 3), _gates(p, "hidden_kernel", 3)
    (bir, biz, bin_), (bhr, bhz, bhn) = _gates(p, "input_bias", 3), _gates(p, "hidden_bias", 3)
    r = sigmoid(x @ wir + bir + h @ whr + bhr)
    z = sigmoid(x @ wiz + biz + h @ whz + bhz)
    n = np.tanh(x @ win + bin_ + r * (h @ whn + bhn))
    return (1 - z) * n + z * h


def rnn(p, x, h):
    return np.tanh(x @ p["input_kernel"] + p["input_bias"] + h @ p["hidden_kernel"] + p["hidden_bias"])


def lstm(p, x, state):
    size = state.shape[-1] // 2
    h, c = state[:, :size], state[:, size:]
    pre = x @ p["input_kernel"] + p["input_bias"] + h @ p["hidden_kernel"] + p["hidden_bias"]
    i, f, g, o = (pre[:, k * size:(k + 1) * size] for k in range(4))
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return np.concatenate([sigmoid(o) * np.tanh(c_new), c_new], axis=1)


CELLS = {"gru": gru, "rnn": rnn, "lstm": lstm}


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def l2_normalize(x):
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True) + 1e-6)
