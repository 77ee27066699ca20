"""transformers "remote code" shipped inside every RMoE export.

The two files next to this one are copied into an export folder by `rmoe_jax.export` (with an
`auto_map` in its config.json), so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the model from the folder alone. They import only torch and transformers (they run
inside transformers' dynamic-module cache, where rmoe_jax is not importable); nothing here
imports them, so `import rmoe_jax.hf_remote` needs neither torch nor transformers.
"""

from __future__ import annotations

import os

CONFIG_FILE = "configuration_llama_moe_rnn.py"
MODELING_FILE = "modeling_llama_moe_rnn.py"
FILES = (CONFIG_FILE, MODELING_FILE)

# config.json "auto_map": Auto class -> "<module file without .py>.<class>".
AUTO_MAP = {
    "AutoConfig": "configuration_llama_moe_rnn.LlamaMoeRNNConfig",
    "AutoModel": "modeling_llama_moe_rnn.LlamaMoeRNNModel",
    "AutoModelForCausalLM": "modeling_llama_moe_rnn.LlamaMoeRNNForCausalLM",
}


def path(name: str) -> str:
    """Absolute path of one of `FILES` (found next to this module, from a checkout or install)."""
    if name not in FILES:
        raise ValueError(f"{name!r} is not one of {', '.join(FILES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
