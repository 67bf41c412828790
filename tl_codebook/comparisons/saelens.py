"""SAELens architecture "codebook": a codebook as an SAE, for SAELens' splicing, evals and trainer.
A codebook (k codes, mean) is a TopK SAE with tied unit-norm weights, no biases, activations 1/k.

Feature `g * num_codes + c` is code `c` of group `g`; `encode` returns the dense activations
`[..., d_sae]` (1/k at each group's k chosen codes, 0 elsewhere), `decode` returns
`feature_acts @ W_dec`. Selection reuses `tl_codebook.snap.select_codes`, so reconstructions are
the codebook's own (inner_product, cosine or euclidean). The only parameter is `codes`
`[n_groups, num_codes, d_group]`; `W_dec` (block-structured `[d_sae, d_in]`), `W_enc`, `b_enc` and
`b_dec` are read-only tensors derived from it (write to `codes`, never to `W_dec.data`).

What we found in SAELens 6.54, and how this module deals with it:
- `HookedSAETransformer` and `run_evals` call `encode` and `decode` only, never `forward`. The
  activations are the constant 1/k, so through them no gradient reaches the input; `sae(x)`
  (`forward`) adds the codebook's straight-through gradient.
- `register_sae_class` raises on a second registration, so `register_codebook_architecture` checks
  the registry first (importing or reloading this module twice is fine).
- `TrainingSAEConfig.__post_init__` looks the inference config up in the registry, so the
  inference class must be registered before any training config is built (done at import).
- `SAE.load_from_disk` builds the SAE on the meta device and assigns the saved tensors, so every
  tensor the SAE needs must be in the state dict (here: `codes` only). `SAEConfig.from_dict`
  passes `metadata` to the config as a plain dict (and fixes it afterwards), so our configs
  accept a dict there.
- `SAETrainer` asserts `SAETrainerConfig.lr_end is not None`; only `LanguageModelSAERunnerConfig`
  fills it in, so set it yourself when driving `SAETrainer` directly.
- `run_evals(exclude_special_tokens=True)` (the default) reads `model.tokenizer`; pass False for a
  model without a tokenizer. `ActivationsStore.reset_input_dataset()` does not rewind the token
  stream that `get_batch_tokens` reads, so run_evals' sparsity batches follow its reconstruction
  batches in the data (wrapping around at the end of the dataset).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, cast

import torch
from jaxtyping import Float
from sae_lens import SAE, TrainingSAE
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.sae import (
    SAEConfig,
    SAEMetadata,
    TrainCoefficientConfig,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.util import dtype_to_str
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.snap import (
    check_similarity,
    code_scores,
    gather_mean,
    l2norm,
    select_codes,
    straight_through,
)

ARCHITECTURE = "codebook"

_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
"""SAELens input normalisations a codebook supports (covariance whitening cannot be folded in)."""


def _check_codebook_sae_config(cfg: CodebookSAEConfig | CodebookTrainingSAEConfig) -> None:
    """Raise a ValueError naming the bad field and its valid values."""
    name = type(cfg).__name__
    for field_name in ("d_in", "d_sae", "k", "n_groups", "chunk_size"):
        value = getattr(cfg, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field_name} must be an integer >= 1, got {value!r}.")
    check_similarity(cfg.similarity)
    for field_name in ("d_in", "d_sae"):
        value = getattr(cfg, field_name)
        if value % cfg.n_groups:
            raise ValueError(
                f"{name}.{field_name}={value} is not divisible by n_groups={cfg.n_groups}: "
                "every group has d_in // n_groups dimensions and d_sae // n_groups codes."
            )
    if cfg.k > cfg.num_codes:
        raise ValueError(
            f"{name}.k={cfg.k} must be between 1 and num_codes = d_sae // n_groups "
            f"= {cfg.num_codes}."
        )
    if cfg.apply_b_dec_to_input:
        raise ValueError(
            f"{name}.apply_b_dec_to_input must be False: a codebook has no decoder bias."
        )
    if cfg.normalize_activations not in _NORMALIZATIONS:
        raise ValueError(
            f"{name}.normalize_activations={cfg.normalize_activations!r} is not supported by a "
            f"codebook; valid choices are {', '.join(_NORMALIZATIONS)}."
        )


def _metadata_from_dict(cfg: CodebookSAEConfig | CodebookTrainingSAEConfig) -> None:
    if isinstance(cfg.metadata, dict):
        cfg.metadata = SAEMetadata(**cfg.metadata)


def _metadata(cfg: CodebookSAEConfig | CodebookTrainingSAEConfig) -> SAEMetadata:
    """The config's metadata (always an SAEMetadata once the config is built)."""
    return cast(SAEMetadata, cfg.metadata)


class _CodebookShape:
    """What both codebook SAE configs derive from their fields: architecture and code layout."""

    d_in: int
    d_sae: int
    n_groups: int

    @classmethod
    def architecture(cls) -> str:
        """SAELens' registry key of the class: "codebook"."""
        return ARCHITECTURE

    @property
    def num_codes(self) -> int:
        """Codes per group: `d_sae // n_groups`."""
        return self.d_sae // self.n_groups

    @property
    def d_group(self) -> int:
        """Input dimensions per group: `d_in // n_groups`."""
        return self.d_in // self.n_groups


@dataclass
class CodebookSAEConfig(_CodebookShape, SAEConfig):
    """SAELens inference config of a codebook: d_sae = n_groups * num_codes.

    `chunk_size` is the codebook's scoring chunk (rows scored at once); `metadata.hook_name` is
    the hook the codebook sits at.

    Raises:
        ValueError: on construction, for a size that is not an integer >= 1, a `d_in` or
            `d_sae` that `n_groups` does not divide, `k > num_codes`, an unknown `similarity`,
            `apply_b_dec_to_input=True`, or an input normalisation a codebook cannot fold in.
    """

    k: int = 1
    """Codes chosen per token and group."""
    n_groups: int = 1
    """Independent groups, each with `d_sae // n_groups` codes over `d_in // n_groups` dims."""
    similarity: str = "inner_product"
    """"inner_product", "cosine" or "euclidean"."""
    chunk_size: int = 1024
    """Rows scored at once when selecting codes (memory, not results)."""
    apply_b_dec_to_input: bool = False
    """Must stay False: a codebook has no decoder bias."""
    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)
    """A dict is accepted (SAELens' `SAEConfig.from_dict` passes one) and made an SAEMetadata."""

    def __post_init__(self) -> None:
        _metadata_from_dict(self)
        super().__post_init__()
        _check_codebook_sae_config(self)


@dataclass
class CodebookTrainingSAEConfig(_CodebookShape, TrainingSAEConfig):
    """SAELens training config of a codebook; loss: SAELens' MSE (sum over dims, mean over tokens).

    Initial codes are i.i.d. N(0, init_std^2), as in `Codebook`; `decoder_init_norm` (SAELens'
    option, off by default here) rescales every initial code to that norm instead.

    Raises:
        ValueError: on construction, for the same bad values as `CodebookSAEConfig`, or a
            negative `init_std`.
    """

    k: int = 1
    """Codes chosen per token and group."""
    n_groups: int = 1
    """Independent groups, each with `d_sae // n_groups` codes over `d_in // n_groups` dims."""
    similarity: str = "inner_product"
    """"inner_product", "cosine" or "euclidean"."""
    chunk_size: int = 1024
    """Rows scored at once when selecting codes (memory, not results)."""
    init_std: float = 1.0
    """Std of the Gaussian initial codes."""
    apply_b_dec_to_input: bool = False
    """Must stay False: a codebook has no decoder bias."""
    decoder_init_norm: float | None = None
    """When set, every initial code is rescaled to this norm (SAELens' option)."""
    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)
    """A dict is accepted (SAELens' `SAEConfig.from_dict` passes one) and made an SAEMetadata."""

    def __post_init__(self) -> None:
        _metadata_from_dict(self)
        super().__post_init__()
        _check_codebook_sae_config(self)
        if not self.init_std >= 0:
            raise ValueError(
                f"CodebookTrainingSAEConfig.init_std must be >= 0, got {self.init_std!r}."
            )


class _CodebookSAEMixin(nn.Module):
    """What the inference and the training codebook SAE share: weights, encode, decode, forward."""

    cfg: CodebookSAEConfig | CodebookTrainingSAEConfig
    codes: nn.Parameter
    # set by SAELens' SAE.__init__; declared for type checkers
    dtype: torch.dtype
    device: torch.device
    d_head: int | None
    hook_z_reshaping_mode: bool
    hook_sae_input: HookPoint
    hook_sae_acts_pre: HookPoint
    hook_sae_acts_post: HookPoint
    hook_sae_recons: HookPoint
    reshape_fn_in: Callable[[Tensor], Tensor]
    reshape_fn_out: Callable[[Tensor, int | None], Tensor]
    run_time_activation_norm_fn_in: Callable[[Tensor], Tensor]
    run_time_activation_norm_fn_out: Callable[[Tensor], Tensor]

    # -- weights: `codes` is the only parameter; the SAE matrices are views derived from it ----

    def _new_codes(self) -> Tensor:
        cfg = self.cfg
        return torch.randn(
            cfg.n_groups, cfg.num_codes, cfg.d_group, dtype=self.dtype, device=self.device
        )

    def initialize_weights(self) -> None:
        """SAELens' weight initialisation: `codes` `[n_groups, num_codes, d_group]`, i.i.d.
        N(0, 1) (the loaders overwrite them with the saved codes)."""
        self.codes = nn.Parameter(self._new_codes())

    def _block_diagonal(self, blocks: Tensor) -> Tensor:
        """`[n_groups, num_codes, d_group]` -> `[d_sae, d_in]`, group g in its own block."""
        return torch.block_diag(*blocks.unbind(0))

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:  # noqa: N802 - SAELens' name
        """Decoder rows: feature g*num_codes + c is code c of group g, zero outside its group."""
        return self._block_diagonal(self.codes)

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:  # noqa: N802 - SAELens' name
        """Encoder whose `x @ W_enc + b_enc` ranks codes like the similarity (within each group).

        inner_product and cosine: the unit-normalised codes (tied to `W_dec` up to norm);
        euclidean: `2 * codes` with `b_enc = -|code|^2`. Selection itself uses `select_codes`.
        """
        keys = 2 * self.codes if self.cfg.similarity == "euclidean" else l2norm(self.codes)
        return self._block_diagonal(keys).T

    @property
    def b_enc(self) -> Float[Tensor, " d_sae"]:
        """Encoder bias `[d_sae]`: `-|code|^2` for euclidean similarity, else zero."""
        if self.cfg.similarity == "euclidean":
            return -(self.codes * self.codes).sum(-1).reshape(-1)
        return torch.zeros(self.cfg.d_sae, dtype=self.codes.dtype, device=self.codes.device)

    @property
    def b_dec(self) -> Float[Tensor, " d_in"]:
        """Always zero: a codebook has no decoder bias."""
        return torch.zeros(self.cfg.d_in, dtype=self.codes.dtype, device=self.codes.device)

    def get_W_dec_norm(self) -> Tensor:  # noqa: N802 - SAELens' name
        """The norm of every decoder row (code), `[d_sae]`, floored at 1e-8."""
        return self.codes.detach().norm(dim=-1).reshape(-1).clamp(min=1e-8)

    # -- encode / decode ------------------------------------------------------------------------

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        """SAELens' input processing (dtype, hook_z flattening, hook, normalisation), no b_dec.

        Raises:
            ValueError: if the processed input's last axis is not `d_in`.
        """
        sae_in = self.reshape_fn_in(sae_in.to(self.dtype))
        sae_in = self.hook_sae_input(sae_in)
        sae_in = self.run_time_activation_norm_fn_in(sae_in)
        if sae_in.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"The codebook SAE at {_metadata(self.cfg).hook_name!r} expects inputs of shape "
                f"[..., d_in={self.cfg.d_in}]"
                + (" (or [..., n_heads, d_head] at hook_z)" if self.hook_z_reshaping_mode else "")
                + f", got {tuple(sae_in.shape)}."
            )
        return sae_in

    def _grouped(self, sae_in: Tensor) -> Tensor:
        return sae_in.reshape(-1, self.cfg.n_groups, self.cfg.d_group)

    def _select(self, rows: Tensor) -> Tensor:
        cfg = self.cfg
        return select_codes(rows, self.codes, cfg.k, cfg.similarity, cfg.chunk_size)

    def _scores(self, rows: Tensor, lead: torch.Size) -> Tensor:
        """The true similarity of every row to every code, `[..., d_sae]` (materialised)."""
        with torch.no_grad():
            scores = code_scores(rows, self.codes, self.cfg.similarity)
        return scores.reshape(*lead, self.cfg.d_sae)

    def _activations(self, ids: Tensor, lead: torch.Size) -> Tensor:
        """Dense feature activations: 1/k at each chosen code, 0 elsewhere, `[..., d_sae]`."""
        cfg = self.cfg
        acts = torch.zeros(
            ids.shape[0], cfg.n_groups, cfg.num_codes, dtype=self.dtype, device=ids.device
        )
        acts.scatter_(-1, ids, 1.0 / cfg.k)
        return acts.reshape(*lead, cfg.d_sae)

    def encode(self, x: Float[Tensor, "..."]) -> Float[Tensor, "... d_sae"]:
        """Dense activations `[..., d_sae]`: 1/k at the k codes each group's `select_codes` picks.

        `hook_sae_acts_pre` receives the similarity scores `[..., d_sae]`, computed only when
        something is hooked there (so plain encoding stays as cheap as the codebook's chunked
        selection); the selection does not read them, so edit `hook_sae_acts_post` to intervene.

        Raises:
            ValueError: for an input whose last axis is not `d_in` (`[..., n_heads, d_head]` at
                a hook_z site).
        """
        sae_in = self.process_sae_in(x)
        lead = sae_in.shape[:-1]
        rows = self._grouped(sae_in)
        if self.hook_sae_acts_pre._forward_hooks:
            self.hook_sae_acts_pre(self._scores(rows, lead))
        return self.hook_sae_acts_post(self._activations(self._select(rows), lead))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "..."]:
        """`feature_acts @ W_dec`, computed block by block (no bias); shaped like the SAE input."""
        cfg = self.cfg
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        lead = feature_acts.shape[:-1]
        grouped = feature_acts.reshape(-1, cfg.n_groups, cfg.num_codes).to(self.codes.dtype)
        out = torch.einsum("rgc,gcd->rgd", grouped, self.codes).reshape(*lead, cfg.d_in)
        out = self.hook_sae_recons(out)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """SAELens' forward (encode, decode, optional error term), with the codebook's gradients.

        The input gets the downstream gradient unchanged (straight-through), the chosen codes get
        it through `decode`, exactly as in `Codebook.forward` without its reconstruction term.
        """
        out = super().forward(x)  # type: ignore[misc]
        cfg = self.cfg
        through = straight_through(
            x.reshape(-1, cfg.n_groups, cfg.d_group).to(out.dtype),
            out.reshape(-1, cfg.n_groups, cfg.d_group),
        )
        return through.reshape(out.shape)

    # -- folding: what SAELens' trainer and loaders do to the weights ----------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Train on `x * s`, run on `x`: every similarity ranks `x` like `x * s`, so codes /= s."""
        self.codes.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        """Not possible for a codebook (its top-k selection is not linear in the input).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "A codebook cannot fold an affine whitening into its codes: its top-k selection is "
            "not linear in the input. Train with normalize_activations in "
            f"{', '.join(_NORMALIZATIONS)}."
        )

    def fold_W_dec_norm(self) -> None:  # noqa: N802 - SAELens' name
        """Not possible for a codebook (its decoder norms are its outputs).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(
            "A codebook's decoder norms are its outputs (activations are the constant 1/k), so "
            "they cannot be folded into the encoder."
        )


class CodebookSAE(_CodebookSAEMixin, SAE[CodebookSAEConfig]):
    """A codebook as a SAELens inference SAE (architecture "codebook"); see the module docstring.

    Its one parameter is `codes` `[n_groups, num_codes, d_group]`; `encode` gives dense
    activations `[..., d_sae]` (1/k at the chosen codes), `decode` maps them back to
    `[..., d_in]`. Build one from a codebook with `codebook_to_sae`, or load it with SAELens.

    Args:
        cfg: the SAE's config.
        use_error_term: SAELens' option: add the reconstruction error back when spliced in.
    """

    def __init__(self, cfg: CodebookSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class CodebookTrainingSAE(_CodebookSAEMixin, TrainingSAE[CodebookTrainingSAEConfig]):
    """A codebook as a SAELens training SAE: MSE loss, gradients to the codes through the gather.

    `training_forward_pass` snaps with `select_codes`, gathers the mean of the chosen codes with
    `gather_mean` (only the k chosen codes per group get gradient, no tokens x codes product) and
    passes the input's gradient straight through, like `Codebook.forward`.

    Args:
        cfg: the training config (SAELens' `TrainingSAEConfig` fields plus the codebook's).
        use_error_term: SAELens' option: add the reconstruction error back when spliced in.
    """

    mse_loss_fn: Callable[[Tensor, Tensor], Tensor]  # set by TrainingSAE.__init__

    def __init__(self, cfg: CodebookTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        """Initial codes `[n_groups, num_codes, d_group]`: N(0, init_std^2), or rescaled to
        `decoder_init_norm` when that is set."""
        codes = self._new_codes() * self.cfg.init_std
        if self.cfg.decoder_init_norm is not None:
            codes = l2norm(codes) * self.cfg.decoder_init_norm
        self.codes = nn.Parameter(codes)

    def encode(self, x: Float[Tensor, "..."]) -> Float[Tensor, "... d_sae"]:
        """Dense activations `[..., d_sae]`, as `CodebookSAE.encode` (1/k at the chosen codes).

        Raises:
            ValueError: for an input whose last axis is not `d_in`.
        """
        return _CodebookSAEMixin.encode(self, x)

    def encode_with_hidden_pre(
        self, x: Float[Tensor, "..."]
    ) -> tuple[Float[Tensor, "... d_sae"], Float[Tensor, "... d_sae"]]:
        """(activations, similarity scores): SAELens' hidden_pre is the scores (materialised)."""
        sae_in = self.process_sae_in(x)
        lead = sae_in.shape[:-1]
        rows = self._grouped(sae_in)
        hidden_pre = self.hook_sae_acts_pre(self._scores(rows, lead))
        return self.hook_sae_acts_post(self._activations(self._select(rows), lead)), hidden_pre

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One SAELens training step's forward: snap, reconstruct, and the MSE loss.

        `sae_in` is `[batch, d_in]`; the output carries `sae_out` (same shape), the dense
        `feature_acts` and the similarity scores as `hidden_pre` (`[batch, d_sae]`), and
        `losses = {"mse_loss": ...}` (summed over dimensions, averaged over tokens).
        """
        sae_in = self.process_sae_in(step_input.sae_in)
        lead = sae_in.shape[:-1]
        rows = self._grouped(sae_in)
        ids = self._select(rows)
        feature_acts = self.hook_sae_acts_post(self._activations(ids, lead))
        quantized = gather_mean(ids, self.codes)
        sae_out = straight_through(rows, quantized).reshape(sae_in.shape)
        sae_out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(sae_out))
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        hidden_pre = self._scores(rows, lead)
        aux_losses = self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        losses = {"mse_loss": mse_loss, **aux_losses}
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
        )

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        """None: the codebook's reconstruction term is SAELens' MSE itself."""
        return {}

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        """No loss coefficients: the codebook's only loss is the MSE."""
        return {}


# -- registration ----------------------------------------------------------------------------


def _same_class(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_codebook_architecture() -> None:
    """Register "codebook" with SAELens (inference and training classes); safe to call again.

    Raises ValueError if another package already registered different classes under "codebook".
    """
    for registry, register, classes in (
        (SAE_CLASS_REGISTRY, register_sae_class, (CodebookSAE, CodebookSAEConfig)),
        (
            SAE_TRAINING_CLASS_REGISTRY,
            register_sae_training_class,
            (CodebookTrainingSAE, CodebookTrainingSAEConfig),
        ),
    ):
        existing = registry.get(ARCHITECTURE)
        if existing is None:
            register(ARCHITECTURE, *classes)  # type: ignore[operator]
        elif all(map(_same_class, existing, classes)):
            registry[ARCHITECTURE] = classes  # type: ignore[assignment] # a reload: newest classes
        else:
            raise ValueError(
                f"SAELens architecture {ARCHITECTURE!r} is already registered to "
                f"{existing[0].__module__}.{existing[0].__qualname__}; tl_codebook cannot register "
                f"{classes[0].__qualname__} under the same name."
            )


register_codebook_architecture()


# -- conversion ------------------------------------------------------------------------------


def codebook_to_sae(codebook: Codebook, use_error_term: bool = False) -> CodebookSAE:
    """`codebook` as a SAELens SAE of architecture "codebook" (copied codes, same reconstructions).

    The SAE's cfg carries d_in, d_sae = n_groups * num_codes, dtype, device, and in its metadata
    the hook name, the codebook's metadata and its full config (for `sae_to_codebook`). At a
    `hook_z` site the SAE flattens `[..., n_heads, d_head]` itself (SAELens' hook_z reshaping).
    Ablated codes (`codebook.ablated`) are not carried over.

    Raises:
        TypeError: if `codebook` is not a `Codebook`.
    """
    if not isinstance(codebook, Codebook):
        raise TypeError(f"codebook_to_sae expects a Codebook, got {type(codebook).__name__}.")
    cb_cfg = codebook.cfg
    hook_name = cb_cfg.hook_name
    metadata = SAEMetadata(
        **{**cb_cfg.metadata, "hook_name": hook_name, "codebook_config": cb_cfg.to_dict()}
    )
    codes = codebook.codes.detach()
    cfg = CodebookSAEConfig(
        d_in=cb_cfg.d_in,
        d_sae=cb_cfg.n_groups * cb_cfg.num_codes,
        dtype=dtype_to_str(codes.dtype),
        device=str(codes.device),
        k=cb_cfg.k,
        n_groups=cb_cfg.n_groups,
        similarity=cb_cfg.similarity,
        chunk_size=cb_cfg.chunk_size,
        reshape_activations="hook_z" if hook_name and hook_name.endswith("hook_z") else "none",
        metadata=metadata,
    )
    sae = CodebookSAE(cfg, use_error_term=use_error_term)
    with torch.no_grad():
        sae.codes.copy_(codes)
    return sae


def sae_to_codebook(sae: SAE[Any]) -> Codebook:
    """The `Codebook` of a "codebook" SAE (inference or training), with a copy of its codes.

    Training-only codebook settings (reconstruction/commitment coefficients, init_std) come from
    the config stored by `codebook_to_sae` when present, else the `CodebookConfig` defaults.

    Raises:
        TypeError: for an SAE of another architecture.
    """
    if not isinstance(sae, _CodebookSAEMixin):
        architecture = getattr(getattr(sae, "cfg", None), "architecture", lambda: "unknown")()
        raise TypeError(
            f"sae_to_codebook needs an SAE of architecture {ARCHITECTURE!r} (CodebookSAE or "
            f"CodebookTrainingSAE), got {type(sae).__name__} of architecture {architecture!r}."
        )
    cfg = sae.cfg
    known = {f.name for f in fields(CodebookConfig)}  # an SAE saved by another tl_codebook version
    stored = {
        key: value
        for key, value in (_metadata(cfg).get("codebook_config") or {}).items()
        if key in known
    }
    stored.update(
        d_in=cfg.d_in,
        num_codes=cfg.num_codes,
        k=cfg.k,
        similarity=cfg.similarity,
        n_groups=cfg.n_groups,
        hook_name=_metadata(cfg).hook_name,
        chunk_size=cfg.chunk_size,
    )
    codebook = Codebook(CodebookConfig.from_dict(stored)).to(sae.codes.device)
    codebook.codes = nn.Parameter(sae.codes.detach().clone())
    return codebook
