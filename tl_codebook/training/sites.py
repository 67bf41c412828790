"""Where codebooks go: a readable site spec ("attn.hook_z:group", "hook_mlp_out:k=8") resolved
against a model into concrete hook names and `CodebookConfig`s, with errors before any work starts.

Spec grammar: `SITE[:group][:key=value ...]`, SITE a per-layer hook name relative to `blocks.L`
(`hook_mlp_out`, `attn.hook_z`, `hook_resid_post`) or a full hook name (`blocks.3.hook_resid_pre`,
`ln_final.hook_normalized`). `group` gives one codebook group per attention head; keys are
`num_codes`, `k`, `similarity`, `layers` (`all`, `0-3`, `1,3`), and the CodebookConfig coefficients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformer_lens import HookedTransformer

from tl_codebook.codebook import CodebookConfig
from tl_codebook.configs import dataclass_from_dict
from tl_codebook.hooks.model import probe_activation_shape, unknown_hook_error

_INT_KEYS = ("num_codes", "k", "n_groups", "chunk_size")
_FLOAT_KEYS = ("reconstruction_coef", "commitment_coef", "init_std")
_STR_KEYS = ("similarity",)


@dataclass
class SiteSpec:
    """One kind of site, at one or more layers, with its codebook settings.

    `resolve_sites` turns it into concrete hook names and `CodebookConfig`s on a model.
    """

    at: str
    """A hook name relative to `blocks.L` ("hook_mlp_out", "attn.hook_z") or a full one."""
    layers: str | None = None
    """None: the run's default layers (TrainConfig.layers, itself 'all' by default)."""
    group: bool = False
    """One codebook group per attention head (for per-head sites such as attn.hook_z)."""
    options: dict[str, object] = field(default_factory=dict)
    """CodebookConfig overrides for this site: num_codes, k, similarity, coefficients."""

    def to_dict(self) -> dict[str, object]:
        """The spec as a JSON-ready dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> SiteSpec:
        """From its JSON form, or from the spec string the CLI takes (`parse_site`).

        Raises:
            ValueError: for a spec string `parse_site` refuses, or a dict with an unknown key,
                no `at`, or a value of the wrong type.
        """
        if isinstance(data, str):
            return parse_site(data)
        return dataclass_from_dict(cls, data)


def parse_site(text: str) -> SiteSpec:
    """Parse `SITE[:group][:key=value ...]` (see the module docstring).

    For example `"attn.hook_z:group:k=8:layers=0-3"` is `SiteSpec(at="attn.hook_z",
    layers="0-3", group=True, options={"k": 8})`. Nothing is checked against a model here;
    `resolve_sites` does that.

    Raises:
        ValueError: for an empty spec, a part that is neither `group` nor `key=value`, an
            unknown key (listing the valid ones), or a value that is not a number where one
            belongs.
    """
    parts = [p.strip() for p in text.split(":") if p.strip()]
    if not parts:
        raise ValueError("Empty site spec; expected e.g. 'hook_mlp_out' or 'attn.hook_z:group'.")
    spec = SiteSpec(at=parts[0])
    valid = ", ".join(("group", "layers", *_INT_KEYS, *_FLOAT_KEYS, *_STR_KEYS))
    for part in parts[1:]:
        if part == "group":
            spec.group = True
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(
                f"Site spec {text!r}: cannot read {part!r}; expected key=value ({valid})."
            )
        try:
            if key == "layers":
                spec.layers = value
            elif key in _INT_KEYS:
                spec.options[key] = int(value)
            elif key in _FLOAT_KEYS:
                spec.options[key] = float(value)
            elif key in _STR_KEYS:
                spec.options[key] = value
            else:
                raise ValueError(
                    f"Site spec {text!r}: unknown option {key!r}; valid options: {valid}."
                )
        except ValueError as err:
            if "unknown option" in str(err):
                raise
            raise ValueError(f"Site spec {text!r}: bad value {value!r} for {key}.") from None
    return spec


def parse_layers(layers: str | list[int], n_layers: int) -> list[int]:
    """`all`, `3`, `0-2`, `1,3` (or a list of ints) -> sorted layer indices, checked against n_layers."""
    if isinstance(layers, list):
        chosen = [int(x) for x in layers]
    elif layers.strip() == "all":
        chosen = list(range(n_layers))
    else:
        chosen = []
        for piece in layers.split(","):
            lo, dash, hi = piece.strip().partition("-")
            try:
                first, last = int(lo), int(hi if dash else lo)
            except ValueError:
                raise ValueError(
                    f"Cannot read layers {layers!r}; use 'all', '3', '0-2' or '1,3'."
                ) from None
            if last < first:
                raise ValueError(
                    f"Layer range {piece.strip()!r} in layers {layers!r} is empty; write the "
                    f"lower layer first ('{last}-{first}')."
                )
            chosen += list(range(first, last + 1))
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(
            f"Layer index(es) {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})."
        )
    return sorted(set(chosen))


def resolve_sites(
    model: HookedTransformer,
    specs: Sequence[SiteSpec | str | dict[str, Any]],
    defaults: dict[str, object] | None = None,
    layers: str = "all",
) -> dict[str, CodebookConfig]:
    """Concrete hook names and codebook configs for `specs` on `model` (widths probed).

    `specs` are `SiteSpec`s, spec strings (`parse_site`) or their JSON dicts. A relative site
    becomes one hook per chosen layer; `d_in` is the activation's size per position, probed with
    a one-token forward.

    Args:
        model: the model the sites are looked up in.
        specs: the sites.
        defaults: CodebookConfig settings for sites that do not set them (e.g.
            `TrainConfig.codebook_defaults()`).
        layers: the layers for sites without their own (`all`, `3`, `0-2`, `1,3`).

    Returns:
        `{hook_name: CodebookConfig}`, in the order of the specs and layers.

    Raises:
        UnknownHookError: for a hook name the model does not have.
        ValueError: for unreadable or out-of-range layers, `:group` on a per-token site, a
            per-head site without `:group` (or a matching `n_groups`), a site named twice, or
            settings `CodebookConfig` refuses (e.g. `k > num_codes`).
    """
    defaults = dict(defaults or {})
    resolved: dict[str, CodebookConfig] = {}
    for spec in (s if isinstance(s, SiteSpec) else SiteSpec.from_dict(s) for s in specs):
        if spec.at in model.hook_dict or not model.cfg.n_layers:
            names = [spec.at]
        else:
            chosen = parse_layers(spec.layers or layers, model.cfg.n_layers)
            names = [f"blocks.{layer}.{spec.at}" for layer in chosen]
        for name in names:
            if name not in model.hook_dict:
                raise unknown_hook_error(name, model.hook_dict)
            shape = probe_activation_shape(model, name)[2:]  # drop (batch, pos)
            d_in = 1
            for size in shape:
                d_in *= size
            options = {**defaults, **spec.options}
            if len(shape) == 2:
                _check_per_head(spec, name, shape, options)
            elif spec.group:
                raise ValueError(
                    f"Site {name!r} has per-token shape {shape}; ':group' needs a per-head "
                    "activation [n_heads, d_head] such as attn.hook_z."
                )
            if name in resolved:
                raise ValueError(f"Site {name!r} is named by more than one spec.")
            resolved[name] = CodebookConfig(d_in=d_in, hook_name=name, **options)  # type: ignore[arg-type]
    return resolved


def _check_per_head(
    spec: SiteSpec, name: str, shape: tuple[int, ...], options: dict[str, object]
) -> None:
    """A per-head site `[n_heads, d_head]` takes one codebook group per head (`:group`, or
    n_groups equal to the head count): a codebook sees a head's vector as one group."""
    n_heads = shape[0]
    if spec.group:
        options["n_groups"] = n_heads
        return
    if options.get("n_groups") == n_heads:
        return
    grouped = f"{spec.at}:group"
    flat = spec.at.rpartition("attn.")[0] + "hook_attn_out" if "attn." in spec.at else None
    instead = f", or use {flat!r} for one codebook over the attention output" if flat else ""
    given = (
        f"n_groups={options['n_groups']} does not fit its {n_heads} heads; "
        if ("n_groups" in options)
        else ""
    )
    raise ValueError(
        f"Site {name!r} is per head (shape {shape}): {given}add ':group' ({grouped!r}) for one "
        f"codebook group per head{instead}."
    )
