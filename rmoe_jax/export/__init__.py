"""Portable checkpoints: export a trained model to safetensors + config.json, and import it back.

    python -m rmoe_jax.export --workdir runs/rmoe --out exports/rmoe [--step N]
        [--dtype float32|bfloat16] [--max_shard_size 5GB] [--overwrite]

The format (README, "Export format"): HF Llama/Mixtral tensor names in PyTorch `nn.Linear`
layout (`[out, in]`), `model.safetensors` or shards plus `model.safetensors.index.json`, a
`config.json` and the tokenizer's files (`tokenizer.model` for SentencePiece; `tokenizer.json`
and a `tokenizer_config.json` for a Hugging Face tokenizer, so `AutoTokenizer` opens it).

* A linear (or frozen random) router exports as a Mixtral checkpoint:
  `transformers.MixtralForCausalLM.from_pretrained(folder)` loads it (and gives our logits
  whenever `config.json["rmoe_jax"]["transformers_exact"]` is true).
* A recurrent router uses the RMoE authors' names (`block_sparse_moe.weight1/weight2`,
  `model.rnn_router.*`) and their `LlamaMoeRNNConfig` fields, and the export carries its own
  transformers code (`rmoe_jax/hf_remote/`, copied in, with an `auto_map` in config.json):
  `transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it
  and gives our logits. A variant that code cannot reproduce (`remote_code_problems`) is
  exported without it, or refused with `remote_code=True` (the CLI's default).
* Everything the spec's names cannot express (router biases, MLP/cosine/XMoE/hyper routers,
  RNN/LSTM cells, S-proj, shared experts) gets names in the same style under the same prefix,
  each listed with its meaning in `config.json["rmoe_jax"]["extension_tensors"]`.
* `config.json["rmoe_jax"]` also holds our full model (and data) config, so `import_export`
  rebuilds the exact model; an unexpected, missing or misshapen tensor is an error.

Public API (all importable from `rmoe_jax.export`; where each lives):
  export_model(model_config, params, out, *, data_config=None, dtype, max_shard_size,
               overwrite, tokenizer_file=None, source=None, remote_code=None) -> out path
  export_workdir(workdir, out, *, step=None, dtype, max_shard_size, overwrite,
                 remote_code=True) -> out path                             [writer.py]
  read_export(folder) -> Export(model_config, params, data_config, tokenizer_file, config_json)
  import_export(folder) -> (model_config, params)                          [reader.py]
  to_torch_tensors(model_config, params) -> {name: np.ndarray}   (the name mapping)
  from_torch_tensors(model_config, tensors) -> params              (its inverse)
  expected_tensors(model_config) -> {name: torch shape}                    [names.py]
  remote_code_problems(model_config) -> why the transformers code cannot run it ([] = it can)
  hf_config / build_config_json(model_config, ...) -> config.json's fields [hf_config_json.py]
  read_tensors(folder) -> {name: np.ndarray}; parse_size("5GB") -> bytes   [safetensors_io.py]
  main(argv) -> exit status (python -m rmoe_jax.export)                    [cli.py]
  ExportError, FORMAT_VERSION, CONFIG_FILE, WEIGHTS_FILE, ..., EXPORT_DTYPES [spec.py]
Reading a training workdir is `rmoe_jax.checkpoint`'s (re-exported here):
  load_workdir(workdir, step=None) -> WorkdirCheckpoint(config, params, step, workdir)
and configs from JSON `rmoe_jax.config_json`'s (config_from_dict, full_config_from_dict, ...).
"""

# The public API, re-exported from the modules that hold it (see the list above).
from rmoe_jax.checkpoint import (DamagedCheckpointError, WorkdirCheckpoint, abstract_params,
                                 load_workdir)
from rmoe_jax.config_json import (config_from_dict, full_config_from_dict,
                                  model_config_from_dict)
from rmoe_jax.export.cli import main
from rmoe_jax.export.hf_config_json import (build_config_json, hf_config, is_mixtral,
                                            remote_code_problems, transformers_notes)
from rmoe_jax.export.names import (Rule, expected_tensors, from_torch_tensors,
                                   to_torch_tensors)
from rmoe_jax.export.reader import Export, import_export, read_export
from rmoe_jax.export.safetensors_io import parse_size, read_tensors
from rmoe_jax.export.spec import (CONFIG_FILE, DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES,
                                  FORMAT_VERSION, HF_TOKENIZER_CONFIG_FILE, HF_TOKENIZER_FILE,
                                  INDEX_FILE, TOKENIZER_FILE, TOKENIZER_FILES, WEIGHTS_FILE,
                                  ExportError)
from rmoe_jax.export.writer import export_model, export_workdir
from rmoe_jax.param_table import CELL_GATES

__all__ = [
    "CELL_GATES", "CONFIG_FILE", "DEFAULT_MAX_SHARD_SIZE", "EXPORT_DTYPES", "FORMAT_VERSION",
    "HF_TOKENIZER_CONFIG_FILE", "HF_TOKENIZER_FILE", "INDEX_FILE", "TOKENIZER_FILE",
    "TOKENIZER_FILES", "WEIGHTS_FILE", "DamagedCheckpointError", "Export", "ExportError", "Rule",
    "WorkdirCheckpoint", "abstract_params", "build_config_json", "config_from_dict",
    "expected_tensors", "export_model", "export_workdir", "from_torch_tensors",
    "full_config_from_dict", "hf_config", "import_export", "is_mixtral", "load_workdir", "main",
    "model_config_from_dict", "parse_size", "read_export", "read_tensors", "remote_code_problems",
    "to_torch_tensors", "transformers_notes",
]
