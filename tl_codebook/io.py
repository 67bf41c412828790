"""Saving and loading codebooks (and fine-tuned model weights): safetensors + JSON, never pickle.

A single codebook is a directory with `cfg.json` and `codebook.safetensors`. A model's set of
codebooks is a directory with `codebooks.json` (configs, the base model's name and shape),
`codebooks.safetensors` and, after joint fine-tuning, `model.safetensors`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.configs import dataclass_from_dict
from tl_codebook.files import TEMP_PREFIX, atomic_directory, atomic_write_json

FORMAT_VERSION = 1
"""The version of the on-disk format written into every `cfg.json` / `codebooks.json`; loading
refuses any other version."""
CODEBOOK_CFG = "cfg.json"
CODEBOOK_WEIGHTS = "codebook.safetensors"
SET_CFG = "codebooks.json"
SET_WEIGHTS = "codebooks.safetensors"
MODEL_WEIGHTS = "model.safetensors"
MODEL_SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx")

__all__ = [
    "FORMAT_VERSION",
    "CodebookFileError",
    "load_codebook",
    "load_codebooks",
    "load_model",
    "model_shape",
    "save_codebook",
    "save_codebooks",
]


class CodebookFileError(ValueError):
    """A saved codebook file that is missing, truncated, corrupted or does not fit.

    A `ValueError`, so the CLI reports it as a one-line user error.
    """


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CodebookFileError(f"Missing file {path}.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CodebookFileError(f"{path} is not valid JSON: {err}.") from None
    if not isinstance(data, dict):
        raise CodebookFileError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _read_tensors(path: Path, device: str | torch.device | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CodebookFileError(f"Missing file {path}.")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CodebookFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from None


def _check_format_version(data: dict[str, Any], path: Path) -> None:
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        found = "no format_version" if version is None else f"format_version {version!r}"
        raise CodebookFileError(
            f"{path} has {found}; this version of tl_codebook reads format_version "
            f"{FORMAT_VERSION} (a file from a newer tl_codebook needs that version)."
        )


@contextmanager
def _saving_directory(path: Path, ours: tuple[str, ...]) -> Iterator[Path]:
    """Build the directory `path` under a temporary name and swap it in whole, so a save that
    is killed midway leaves the previous complete save (or none), never a half one.

    Swapping replaces the directory as a whole, so a directory holding files other than a
    previous save of the same kind is refused rather than emptied.
    """
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Cannot save codebooks to {path}: it exists and is not a directory.")
        foreign = sorted(
            p.name
            for p in path.iterdir()
            if p.name not in ours and not p.name.startswith(TEMP_PREFIX)
        )
        if foreign:
            raise ValueError(
                f"Cannot save codebooks to {path}: it holds other files {foreign[:5]}, which "
                "replacing the directory as a whole would delete; choose a new or empty directory."
            )
    with atomic_directory(path) as building:
        yield building


def _codebook_from(cfg: CodebookConfig, codes: torch.Tensor, source: Path) -> Codebook:
    expected = (cfg.n_groups, cfg.num_codes, cfg.d_group)
    if tuple(codes.shape) != expected:
        raise CodebookFileError(
            f"{source}: codes of shape {tuple(codes.shape)} do not fit the config {expected}."
        )
    cb = Codebook(cfg)
    with torch.no_grad():
        cb.codes.copy_(codes)
    return cb.to(codes.device)


def save_codebook(codebook: Codebook, path: str | Path) -> Path:
    """Save one codebook to the directory `path`: `cfg.json` and `codebook.safetensors`.

    The directory is built under a temporary name and swapped in whole, so an interrupted save
    leaves the previous save (or nothing), never half of one.

    Returns:
        `path`, as a `Path`.

    Raises:
        ValueError: if `path` exists and is not a directory, or is a directory holding files
            other than a previous codebook save (replacing it would delete them).
    """
    path = Path(path)
    with _saving_directory(path, (CODEBOOK_CFG, CODEBOOK_WEIGHTS)) as building:
        save_file(
            {"codes": codebook.codes.detach().contiguous().cpu()}, str(building / CODEBOOK_WEIGHTS)
        )
        atomic_write_json(
            building / CODEBOOK_CFG, {"format_version": FORMAT_VERSION, **codebook.cfg.to_dict()}
        )
    return path


def load_codebook(path: str | Path, device: str | torch.device | None = None) -> Codebook:
    """Load a codebook saved by `save_codebook` / `Codebook.save`.

    Args:
        path: the directory written by `save_codebook`.
        device: where the codes go (default CPU).

    Raises:
        CodebookFileError: for a missing or invalid `cfg.json`, another `format_version`, an
            unreadable `codebook.safetensors`, no `codes` tensor, or codes whose shape is not
            `[n_groups, num_codes, d_group]` of the config.
        ValueError: for a config that fails `CodebookConfig`'s checks (an unknown key, ...).
    """
    path = Path(path)
    data = _read_json(path / CODEBOOK_CFG)
    _check_format_version(data, path / CODEBOOK_CFG)
    cfg = CodebookConfig.from_dict(data)
    tensors = _read_tensors(path / CODEBOOK_WEIGHTS, device)
    if "codes" not in tensors:
        raise CodebookFileError(f"{path / CODEBOOK_WEIGHTS} has no 'codes' tensor.")
    return _codebook_from(cfg, tensors["codes"], path)


def model_shape(model: torch.nn.Module) -> dict[str, Any]:
    """The fields of a TransformerLens model's config that codebooks depend on.

    Returns:
        `{name: value}` for `n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx` (None
            where the config lacks one); `{}` for a module without a `cfg`.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    return {key: getattr(cfg, key, None) for key in MODEL_SHAPE_KEYS}


def _codebook_parameter_names(model: torch.nn.Module) -> set[str]:
    from tl_codebook.hooks.model import codebooks_of

    return {
        f"{name}.{p}" for name, cb in codebooks_of(model).items() for p, _ in cb.named_parameters()
    }


def save_codebooks(
    model: torch.nn.Module, path: str | Path, save_model_weights: bool | None = None
) -> Path:
    """Save every codebook of `model` to the directory `path`.

    `save_model_weights=None` saves the model's own weights too when the model was fine-tuned
    with its codebooks (`model.fine_tuned` set by the joint trainer); True/False force it.
    The directory holds `codebooks.json` (configs, the model's name and shape),
    `codebooks.safetensors` and, with the model's weights, `model.safetensors`; like
    `save_codebook` it is swapped in whole.

    Returns:
        `path`, as a `Path`.

    Raises:
        ValueError: if the model has no codebooks, or `path` exists and is not a directory or
            holds files other than a previous save of codebooks.
    """
    from tl_codebook.hooks.model import codebooks_of

    path = Path(path)
    present = codebooks_of(model)
    if not present:
        raise ValueError("The model has no codebooks to save.")
    if save_model_weights is None:
        save_model_weights = bool(getattr(model, "fine_tuned", False))
    cfg = getattr(model, "cfg", None)
    with _saving_directory(path, (SET_CFG, SET_WEIGHTS, MODEL_WEIGHTS)) as building:
        save_file(
            {f"{name}.codes": cb.codes.detach().contiguous().cpu() for name, cb in present.items()},
            str(building / SET_WEIGHTS),
        )
        weights_file = None
        if save_model_weights:
            skip = _codebook_parameter_names(model)
            state = {
                k: v.detach().cpu().clone().contiguous()
                for k, v in model.state_dict().items()
                if k not in skip
            }
            save_file(state, str(building / MODEL_WEIGHTS))
            weights_file = MODEL_WEIGHTS
        atomic_write_json(
            building / SET_CFG,
            {
                "format_version": FORMAT_VERSION,
                "model_name": getattr(cfg, "model_name", None),
                "model_shape": model_shape(model),
                "model_weights": weights_file,
                "codebooks": {name: cb.cfg.to_dict() for name, cb in present.items()},
            },
        )
    return path


def load_codebooks(
    model: torch.nn.Module, path: str | Path, load_model_weights: bool = True
) -> dict[str, Codebook]:
    """Load codebooks saved by `save_codebooks` into `model`, replacing any at those sites.

    All or nothing: every file is read, every codebook built and every site and weight checked
    before the model is touched, so on any error (unreadable files, a model of another shape,
    a site that cannot take its codebook, weights that do not fit) the model is as before.

    Args:
        model: the model to load into (codebooks go to its parameters' device).
        path: the directory written by `save_codebooks`.
        load_model_weights: also load `model.safetensors` when the save has one (it then sets
            `model.fine_tuned`); False loads the codebooks only.

    Returns:
        `{site: codebook}` for the codebooks loaded (now attached to `model`).

    Raises:
        CodebookFileError: for a missing or invalid file, another `format_version`, a model of
            another shape than the one saved, a missing codebook tensor, codes that do not fit
            their config, or model weights with missing, unexpected or wrongly shaped tensors.
        ValueError: for a saved config that fails `CodebookConfig`'s checks, or a site that
            cannot take its codebook (hooks attached there, a width that does not fit).
        UnknownHookError: for a saved site that is not a hook point of `model`.
    """
    from tl_codebook.hooks.model import (
        attach_codebook,
        check_attachable,
        codebooks_of,
        detach_codebook,
    )

    path = Path(path)
    meta = _read_json(path / SET_CFG)
    _check_format_version(meta, path / SET_CFG)
    for key in ("codebooks", "model_shape"):
        if key not in meta:
            raise CodebookFileError(f"{path / SET_CFG} has no {key!r} entry.")
    saved_shape, shape = meta["model_shape"], model_shape(model)
    if saved_shape and shape and saved_shape != shape:
        diff = {
            k: (saved_shape.get(k), shape.get(k))
            for k in shape
            if saved_shape.get(k) != shape.get(k)
        }
        raise CodebookFileError(
            f"Codebooks in {path} were saved for a model of shape {saved_shape} "
            f"({meta.get('model_name')}), but this model has shape {shape}; differing: "
            + ", ".join(f"{k} saved {a} vs model {b}" for k, (a, b) in diff.items())
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    tensors = _read_tensors(path / SET_WEIGHTS, device)
    loaded: dict[str, Codebook] = {}
    for name, cfg_dict in meta["codebooks"].items():
        if f"{name}.codes" not in tensors:
            raise CodebookFileError(f"{path / SET_WEIGHTS} has no tensor for codebook {name!r}.")
        loaded[name] = _codebook_from(
            CodebookConfig.from_dict(cfg_dict), tensors[f"{name}.codes"], path
        )
    model_state = None
    if load_model_weights and meta.get("model_weights"):
        weights_path = path / meta["model_weights"]
        model_state = _read_tensors(weights_path, device)
        skip = _codebook_parameter_names(model) | {f"{name}.codes" for name in loaded}
        _check_state_fits(model, model_state, skip, weights_path)
    for name, cb in loaded.items():
        check_attachable(model, cb, name, replacing=True)
    # nothing below can fail on what was checked above
    present = codebooks_of(model)
    for name, cb in loaded.items():
        if name in present:
            detach_codebook(model, name)
        attach_codebook(model, cb, name, check_width=False)
    if model_state is not None:
        model.load_state_dict(model_state, strict=False)
        model.fine_tuned = True  # type: ignore[assignment]
    return loaded


def _check_state_fits(
    model: torch.nn.Module, state: dict[str, torch.Tensor], skip: set[str], source: Path
) -> None:
    """Raise unless `state` holds exactly the model's own (non-codebook) tensors, shapes equal."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} saved {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise CodebookFileError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {wrong[:5]}."
        )


def load_model(
    model: str,
    device: str | None = None,
    architecture: str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
):  # noqa: ANN201 - returns HookedCodebookTransformer
    """A HookedCodebookTransformer the TransformerLens way, from one string.

    - a `.json` file: a `HookedTransformerConfig` as JSON (a fresh, randomly initialised model);
    - a `.gguf` file, a local Hugging Face folder of a Llama-family model (with no
      `architecture` given), or a named shortcut such as "smollm2-135m"
      (`tl_codebook.llama.LLAMA_SHORTCUTS`): converted by `tl_codebook.llama.load_llama`, no
      hub needed;
    - a local directory of a Hugging Face model: loaded with transformers, converted by
      TransformerLens as `architecture` (a TransformerLens model name, e.g. "gpt2");
    - anything else: a name for `HookedTransformer.from_pretrained` (downloads from the hub).

    `trust_remote_code` (the CLI's `--trust-remote-code`) is the only way to let a model or
    tokenizer run Python code from its files: a config file that asks for it is refused, because
    reading a file must never run code the user did not ask for.

    Args:
        model: a `.json` config file, a local Hugging Face model directory, or a model name.
        device: where the model goes (TransformerLens' default when None).
        architecture: for a local directory, the TransformerLens name of its architecture.
        trust_remote_code: allow the model's own Python code to run.
        **from_pretrained_kwargs: passed on to `HookedTransformer.from_pretrained` (for a
            Llama-family file or shortcut: to `load_llama`, e.g. `n_ctx`, `dtype`).

    Raises:
        TypeError: if `trust_remote_code` is not a bool.
        CodebookFileError: for a `.json` file that is missing or not a JSON object.
        ValueError: for a `.json` config that asks for `trust_remote_code` without the flag, or
            has an unknown key or a wrongly typed value; for a local directory without
            `architecture` that is not a Llama folder, or whose files transformers cannot load;
            for a shortcut whose wheel is not installed (the pip command is named).
    """
    from transformer_lens import HookedTransformerConfig

    from tl_codebook.hooks.model import HookedCodebookTransformer

    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}.")
    from tl_codebook.llama import LLAMA_SHORTCUTS, is_llama_folder, load_llama

    path = Path(model)
    if (
        model in LLAMA_SHORTCUTS
        or path.suffix == ".gguf"
        or (architecture is None and path.is_dir() and is_llama_folder(path))
    ):
        return load_llama(model, device=device, **from_pretrained_kwargs)
    if path.suffix == ".json":
        data = _read_json(path)
        asked = data.get("trust_remote_code", False)
        if asked is not False and asked is not None and not trust_remote_code:
            raise ValueError(
                f"{path} sets trust_remote_code={asked!r}, which would let its tokenizer or model "
                "files run Python code; a file cannot allow that. Pass --trust-remote-code "
                "(load_model(..., trust_remote_code=True)) if you trust that code."
            )
        data["trust_remote_code"] = trust_remote_code and bool(asked)
        if isinstance(
            data.get("dtype"), str
        ):  # "torch.float32" as written by json.dumps(default=str)
            data["dtype"] = getattr(torch, data["dtype"].removeprefix("torch."))
        if device is not None:
            data["device"] = device
        try:  # a string where a number belongs, an unknown key: name the field and the file
            config = dataclass_from_dict(HookedTransformerConfig, data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return HookedCodebookTransformer(config)
    if path.is_dir():
        if architecture is None:
            raise ValueError(
                f"{path} is a local Hugging Face model directory: also give its TransformerLens "
                "architecture name (e.g. --architecture gpt2) so TransformerLens can convert it."
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (SafetensorError, OSError, ValueError) as err:
            files = ", ".join(sorted(p.name for p in path.iterdir() if p.is_file()))
            raise ValueError(
                f"cannot load the Hugging Face model in {path} (a truncated, corrupted or "
                f"mismatched file among {files}?): {err}"
            ) from None
        return HookedCodebookTransformer.from_pretrained(
            architecture,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=device,
            trust_remote_code=trust_remote_code,
            **from_pretrained_kwargs,
        )
    return HookedCodebookTransformer.from_pretrained(
        model, device=device, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
    )
