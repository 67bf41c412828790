"""The methods compared: codebooks and SAELens SAEs behind one interface, trained on one store.
A method is anything with `encode(x) -> [..., d_sae]` and `decode(acts) -> [..., d_in]`.

`train_method(spec, store, config)` trains one kind of method on an `ActivationStore` with the
matched budget of a `TrainingConfig` (same tokens, same batches, same order for every method):

- `codebook`: the package's one trainer on the store's activations
  (`training.train_codebooks_on_activations`: the frozen-mode reconstruction objective) with
  SAETrainer's settings (Adam, constant lr, gradient norm clipped at 1, SAELens' MSE summed over
  dimensions), codes set by the one initialisation (`training.codebook_init`: k-means, real
  activations, or N(0, 1)) on a sample drawn apart from the training stream.
- `codebook_saelens`: the same codebook, same initial codes, trained by SAELens' `SAETrainer`
  through the registered "codebook" architecture, so the two trainings can be compared.
- `topk`, `batchtopk`, `standard`, `jumprelu`: SAELens SAEs trained by `SAETrainer`.

`as_method(obj)` wraps anything already trained (a `Codebook`, any SAELens SAE, or an object with
encode/decode and `d_in`/`d_sae`) so that the same metrics code serves all of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_codebook.codebook import Codebook, CodebookConfig
from tl_codebook.comparisons.store import ActivationStore
from tl_codebook.configs import check_choice, dataclass_from_dict, did_you_mean
from tl_codebook.files import atomic_directory, check_safe_name
from tl_codebook.hooks.interventions import insert_codes
from tl_codebook.snap import check_similarity
from tl_codebook.training.config import CODEBOOK_INITS

METHOD_KINDS: dict[str, str] = {
    "codebook": "codebook (k codes, mean), trained by our trainer on the store",
    "codebook_saelens": "the same codebook, trained by SAELens' SAETrainer (architecture 'codebook')",
    "topk": "SAELens TopK SAE (the closest analogue of a codebook)",
    "batchtopk": "SAELens BatchTopK SAE (k active on average over a batch; runs as JumpReLU)",
    "standard": "SAELens standard SAE (ReLU, L1 penalty)",
    "jumprelu": "SAELens JumpReLU SAE (L0 penalty)",
}
CODEBOOK_KINDS = ("codebook", "codebook_saelens")


def check_kind(kind: str) -> str:
    """Return `kind` if it is a method kind, else raise a ValueError listing the valid ones."""
    if kind not in METHOD_KINDS:
        raise ValueError(
            f"Unknown method {kind!r}; valid methods are {', '.join(METHOD_KINDS)}."
            + did_you_mean(kind, METHOD_KINDS)
        )
    return kind


@dataclass
class MethodSpec:
    """One method to train: its kind and what differs from the comparison's shared settings.

    Raises:
        ValueError: on construction, for an unknown `kind` (listing the valid ones), a `name`
            that cannot be a directory name, an unknown `similarity` or `codebook_init`, sizes
            that are not integers >= 1, or `n_groups != 1` for a non-codebook method.
    """

    kind: str
    """One of `METHOD_KINDS`: "codebook", "codebook_saelens", "topk", "batchtopk", "standard",
    "jumprelu"."""
    name: str | None = None
    """Row label (default: `{kind}-k{k}`, or `{kind}-l1{coef}` for standard/jumprelu)."""
    d_sae: int | None = None
    """Latents (codebooks: n_groups * codes); None: the TrainingConfig's."""
    k: int | None = None
    """Active codes/latents per token (codebook, topk, batchtopk); None: the TrainingConfig's."""
    lr: float | None = None
    """None: the TrainingConfig's."""
    l1_coefficient: float = 5.0
    """standard: weight of the L1 penalty."""
    l0_coefficient: float = 1.0
    """jumprelu: weight of the L0 penalty."""
    similarity: str = "inner_product"
    """Codebooks: how inputs score against codes ("inner_product", "cosine", "euclidean")."""
    n_groups: int = 1
    """Codebooks: independent codebooks over equal slices of d_in (e.g. one per head at hook_z)."""
    codebook_init: str = "kmeans"
    """Codebooks: "kmeans", "activations" or "random" initial codes (see `CODEBOOK_INITS`)."""

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if self.name is not None:
            check_safe_name(self.name, "MethodSpec.name")  # it names the method's directory
        check_similarity(self.similarity)
        check_choice("MethodSpec.codebook_init", self.codebook_init, CODEBOOK_INITS)
        if (
            isinstance(self.n_groups, bool)
            or not isinstance(self.n_groups, int)
            or self.n_groups < 1
        ):
            raise ValueError(f"MethodSpec.n_groups must be an integer >= 1, got {self.n_groups!r}.")
        for name in ("d_sae", "k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"MethodSpec.{name} must be an integer >= 1 or None, got {value!r}."
                )
        if self.n_groups != 1 and self.kind not in CODEBOOK_KINDS:
            raise ValueError(f"MethodSpec.n_groups applies to codebooks only, not {self.kind!r}.")

    def resolved(self, config: TrainingConfig, d_in: int | None = None) -> MethodSpec:
        """A copy with d_sae, k, lr and name filled in from `config`, checked to be trainable:
        k fits d_sae (per group for codebooks), n_groups divides d_sae (and `d_in` when given).

        Everything a training would only discover later fails here, before any work.

        Raises:
            ValueError: for a `k` larger than the latents (codes per group, for codebooks), or
                an `n_groups` that does not divide `d_sae` or `d_in`.
        """
        d_sae = self.d_sae or config.d_sae
        k = self.k or config.k
        lr = self.lr if self.lr is not None else config.lr
        name = self.name
        if name is None:
            if self.kind == "standard":
                name = f"standard-l1_{self.l1_coefficient:g}"
            elif self.kind == "jumprelu":
                name = f"jumprelu-l0_{self.l0_coefficient:g}"
            else:
                name = f"{self.kind}-k{k}"
        spec = dataclasses.replace(self, d_sae=d_sae, k=k, lr=lr, name=name)
        spec._check_sizes(d_in)
        return spec

    def _check_sizes(self, d_in: int | None) -> None:
        assert self.d_sae is not None and self.k is not None
        where = f"Method {self.name!r} ({self.kind})"
        if self.kind in CODEBOOK_KINDS:
            if self.d_sae % self.n_groups:
                raise ValueError(
                    f"{where}: n_groups={self.n_groups} must divide d_sae={self.d_sae} (each "
                    "group has d_sae // n_groups codes)."
                )
            if d_in is not None and d_in % self.n_groups:
                raise ValueError(
                    f"{where}: n_groups={self.n_groups} must divide the activations' width "
                    f"d_in={d_in}."
                )
            per_group = self.d_sae // self.n_groups
            if self.k > per_group:
                raise ValueError(
                    f"{where}: k={self.k} is more than the {per_group} codes per group "
                    f"(d_sae={self.d_sae} / n_groups={self.n_groups}); use k <= {per_group}."
                )
        elif self.kind in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(
                f"{where}: k={self.k} is more than d_sae={self.d_sae} latents; use k <= "
                f"{self.d_sae} or a larger d_sae."
            )

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """`KIND[:key=value...]`, e.g. `topk`, `codebook:k=4`, `standard:l1_coefficient=2`.

        Raises:
            ValueError: for an option that is not `key=value` with a known key, a value that is
                not a number where one belongs, or a spec the class refuses (unknown kind, ...).
        """
        kind, *options = text.split(":")
        fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {"kind": kind.strip()}
        for option in options:
            key, sep, raw = option.partition("=")
            key = key.strip()
            if not sep or key not in fields_by_name or key == "kind":
                valid = [n for n in fields_by_name if n != "kind"]
                raise ValueError(
                    f"Bad method option {option!r} in {text!r}: expected key=value with key one "
                    f"of {', '.join(valid)}."
                )
            number: type[int] | type[float] | None = None
            if key in ("d_sae", "k", "n_groups"):
                number = int
            elif key in ("lr", "l1_coefficient", "l0_coefficient"):
                number = float
            try:
                values[key] = number(raw) if number is not None else raw
            except ValueError:
                kind_of = "an integer" if number is int else "a number"
                raise ValueError(
                    f"Bad method option {option!r} in {text!r}: {key} must be {kind_of}."
                ) from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSpec:
        """The spec a dict from `to_dict` describes.

        Raises:
            ValueError: for an unknown key, a value of the wrong type, or any check of the
                class.
        """
        return dataclass_from_dict(cls, data)


@dataclass
class TrainingConfig:
    """The matched budget every method trains with: same store, hook, tokens, batches, seed.

    Raises:
        ValueError: on construction, for a size or count that is not an integer >= 1, or an
            `lr` that is not finite and > 0.
    """

    hook_name: str
    """The store's hook whose activations every method reconstructs."""
    d_sae: int = 128
    """Latents (codes) per method, unless its spec sets its own."""
    k: int = 1
    """Active latents / codes per token, unless a spec sets its own."""
    training_tokens: int = 1_000_000
    """Tokens each method sees (epochs over the store repeat as needed)."""
    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 3e-3
    """Learning rate (Adam, constant), unless a spec sets its own."""
    seed: int = 0
    """Seeds the batch order, the initial codes and SAELens' initialisation."""
    exclude_token_ids: list[int] | None = None
    """Tokens never trained on, evaluated or spliced (e.g. BOS, whose activations are outliers).
    None: the task's (`Task.exclude_token_ids`) when the comparison has a task, else none."""
    init_tokens: int = 16384
    """Codebooks: activations sampled (apart from the training stream) for the initial codes."""
    kmeans_iters: int = 25
    """Lloyd iterations of the codebooks' k-means initialisation."""
    dead_feature_window: int | None = None
    """SAELens: steps without firing after which a latent counts as dead (TopK's AuxK loss then
    trains it); None: min(1000, steps // 10), SAELens' 1000 scaled to short runs."""
    device: str = "cpu"
    """Where training runs ("cpu", "cuda", ...)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "k", "training_tokens", "batch_size", "init_tokens", "kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingConfig.{name} must be an integer >= 1, got {value!r}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainingConfig.lr must be finite and > 0, got {self.lr!r}.")
        if self.exclude_token_ids is not None:
            self.exclude_token_ids = [int(t) for t in self.exclude_token_ids]

    @property
    def excluded(self) -> list[int]:
        """`exclude_token_ids` as a list (None, not yet resolved against a task: nothing)."""
        return list(self.exclude_token_ids or [])

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (the inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """The config a dict from `to_dict` describes.

        Raises:
            ValueError: for an unknown or missing key, a value of the wrong type, or any check
                of the class.
        """
        return dataclass_from_dict(cls, data)


# -- the interface ----------------------------------------------------------------------------


def _dense(acts: Tensor) -> Tensor:
    return acts.to_dense() if acts.is_sparse else acts


@dataclass(eq=False)
class TrainedMethod:
    """A method ready to evaluate: `encode`/`decode` of `sae`, plus what its training cost.

    `sae` is a SAELens SAE or any object with encode/decode; `codebook` is set for codebooks
    (steering then forces the code, as `force_codes` does, instead of clamping an activation).
    """

    name: str
    """Row label in the comparison (and its directory name)."""
    kind: str
    """The method kind ("codebook", "topk", ..., or "custom")."""
    sae: Any
    """The trained SAELens SAE (a `CodebookSAE` for codebooks) or custom object."""
    d_in: int
    """Activation width it reconstructs."""
    d_sae: int
    """Latents (for codebooks: n_groups * num_codes)."""
    hook_name: str | None = None
    """The hook its activations come from."""
    codebook: Codebook | None = None
    """The `Codebook` itself, for codebook methods."""
    train_tokens: int = 0
    """Activations (tokens) seen in training."""
    train_seconds: float = math.nan
    """Wall time of the training (NaN when unknown, e.g. wrapped with `as_method`)."""
    init_tokens: int = 0
    """Tokens looked at before training (the codebooks' k-means sample); not in train_tokens."""
    init_seconds: float = 0.0
    """Wall time of that initialisation."""
    spec: MethodSpec | None = None
    """The resolved spec it was trained from (None when wrapped with `as_method`)."""

    @property
    def tokens_per_second(self) -> float:
        """Training throughput: `train_tokens / train_seconds` (NaN when either is unknown)."""
        if not self.train_tokens or not self.train_seconds > 0:
            return math.nan
        return self.train_tokens / self.train_seconds

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"Method {self.name!r} has d_in={self.d_in} but got activations of width "
                f"{x.shape[-1]} (shape {tuple(x.shape)})."
            )

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Dense latent activations `[..., d_sae]` of activations `x` `[..., d_in]`.

        Raises:
            ValueError: if the last axis of `x` is not `d_in`.
        """
        self._check_width(x)
        return _dense(self.sae.encode(x))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction `[..., d_in]` of latent activations `acts` `[..., d_sae]`."""
        return self.sae.decode(acts)

    def reconstruct(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """decode(encode(x)) (for codebooks, the snap itself: no dense activations built).

        Returns:
            `[..., d_in]`, in the dtype of `x`.

        Raises:
            ValueError: if the last axis of `x` is not `d_in`.
        """
        self._check_width(x)
        if self.codebook is not None:
            return self.codebook.decode(self.codebook.encode(x)).to(x.dtype)
        return self.decode(self.encode(x)).to(x.dtype)

    def steer(
        self, x: Float[Tensor, "... d_in"], latent: int, value: float
    ) -> Float[Tensor, "... d_in"]:
        """The reconstruction of `x` with `latent` forced on.

        Codebooks: the code takes the first of its group's k slots, the natural codes keep their
        order in the rest (`insert_codes`, what `force_codes` does). Other methods: the latent's
        activation is clamped to `value` (its typical active value), the others left as they are.

        Args:
            x: activations `[..., d_in]`.
            latent: the latent to force, `0 <= latent < d_sae` (for codebooks
                `group * num_codes + code`).
            value: the activation to clamp it to (not used by codebooks).

        Returns:
            The steered reconstruction `[..., d_in]`, in the dtype of `x`.

        Raises:
            ValueError: if the last axis of `x` is not `d_in`, or `latent` is out of range.
        """
        self._check_width(x)
        if not 0 <= latent < self.d_sae:
            raise ValueError(f"latent must be in [0, {self.d_sae - 1}], got {latent}.")
        if self.codebook is not None:
            cb = self.codebook
            group, code = divmod(latent, cb.cfg.num_codes)
            ids = cb.encode(x)
            forced = torch.tensor([code], dtype=ids.dtype, device=ids.device)
            ids[..., group, :] = insert_codes(ids[..., group, :], forced)
            return cb.decode(ids).to(x.dtype)
        acts = self.encode(x).clone()
        acts[..., latent] = value
        return self.decode(acts).to(x.dtype)

    def to(self, device: str | torch.device) -> TrainedMethod:
        """Move the SAE (and codebook) to `device` in place; returns `self`."""
        if isinstance(self.sae, torch.nn.Module):
            self.sae.to(device)
        if self.codebook is not None:
            self.codebook.to(device)
        return self


# -- reference methods (known answers) ----------------------------------------------------------


class IdentityMethod:
    """encode = decode = identity (d_sae = d_in): splicing it changes nothing."""

    def __init__(self, d_in: int):
        self.d_in = self.d_sae = d_in

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return x

    def decode(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return acts


class ZeroMethod:
    """Every latent off and a zero reconstruction: the zero-ablation baseline as a method."""

    def __init__(self, d_in: int, d_sae: int = 1):
        self.d_in, self.d_sae = d_in, d_sae

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return x.new_zeros(*x.shape[:-1], self.d_sae)

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return acts.new_zeros(*acts.shape[:-1], self.d_in)


def as_method(
    obj: Any,
    name: str | None = None,
    hook_name: str | None = None,
    kind: str | None = None,
) -> TrainedMethod:
    """Wrap a trained `Codebook`, a SAELens SAE, or any object with encode/decode as a method.

    A plain object must say its sizes as `d_in` and `d_sae` attributes (or `cfg.d_in`/`cfg.d_sae`).
    A `TrainedMethod` is returned as it is. `name`, `hook_name` and `kind` override what is read
    from the object.

    Raises:
        TypeError: for an object without callable `encode` and `decode`, or without its sizes.
    """
    from sae_lens import SAE

    from tl_codebook.comparisons.saelens import _CodebookSAEMixin, sae_to_codebook

    if isinstance(obj, TrainedMethod):
        return obj
    if isinstance(obj, Codebook):
        sae = obj.to_sae()
        sae.turn_off_forward_pass_hook_z_reshaping()  # the store holds flattened activations
        return TrainedMethod(
            name=name or f"codebook-k{obj.cfg.k}",
            kind=kind or "codebook",
            sae=sae,
            d_in=obj.cfg.d_in,
            d_sae=obj.cfg.n_groups * obj.cfg.num_codes,
            hook_name=hook_name or obj.cfg.hook_name,
            codebook=obj,
        )
    if isinstance(obj, SAE):
        obj.turn_off_forward_pass_hook_z_reshaping()
        is_codebook = isinstance(obj, _CodebookSAEMixin)
        architecture = obj.cfg.architecture()
        return TrainedMethod(
            name=name or architecture,
            kind=kind or ("codebook" if is_codebook else architecture),
            sae=obj,
            d_in=obj.cfg.d_in,
            d_sae=obj.cfg.d_sae,
            hook_name=hook_name or obj.cfg.metadata.hook_name,
            codebook=sae_to_codebook(obj) if is_codebook else None,
        )
    if not (callable(getattr(obj, "encode", None)) and callable(getattr(obj, "decode", None))):
        raise TypeError(
            f"A method needs encode(x) -> [..., d_sae] and decode(acts) -> [..., d_in]; "
            f"{type(obj).__name__} lacks them. Pass a Codebook, a SAELens SAE or such an object."
        )
    cfg = getattr(obj, "cfg", None)
    d_in = getattr(obj, "d_in", None) or getattr(cfg, "d_in", None)
    d_sae = getattr(obj, "d_sae", None) or getattr(cfg, "d_sae", None)
    if d_in is None or d_sae is None:
        raise TypeError(
            f"{type(obj).__name__} must say its sizes as d_in and d_sae attributes (or cfg.d_in "
            "and cfg.d_sae)."
        )
    return TrainedMethod(
        name=name or type(obj).__name__,
        kind=kind or "custom",
        sae=obj,
        d_in=int(d_in),
        d_sae=int(d_sae),
        hook_name=hook_name,
    )


# -- training ----------------------------------------------------------------------------------


class CountingIterator:
    """Passes batches through and counts the tokens (rows) handed out."""

    def __init__(self, batches: Iterator[Tensor], device: str | torch.device = "cpu"):
        self.batches, self.device, self.tokens = batches, device, 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> Tensor:
        batch = next(self.batches)
        self.tokens += batch.shape[0]
        return batch.to(self.device)


def _training_batches(
    store: ActivationStore, config: TrainingConfig, device: str | torch.device
) -> CountingIterator:
    """The same stream for every method: same tokens, same batches, same order."""
    return CountingIterator(
        store.batches(
            config.hook_name,
            batch_size=config.batch_size,
            n_tokens=config.training_tokens,
            seed=config.seed,
            exclude_token_ids=config.excluded,
        ),
        device,
    )


def _codebook_site(config: TrainingConfig) -> str:
    """The name the trainer knows the comparison's codebook by (its seed derives from it)."""
    return config.hook_name


def _new_codebook(spec: MethodSpec, d_in: int, config: TrainingConfig) -> Codebook:
    assert spec.d_sae is not None and spec.k is not None
    return Codebook(
        CodebookConfig(
            d_in=d_in,
            num_codes=spec.d_sae // spec.n_groups,
            k=spec.k,
            similarity=spec.similarity,
            n_groups=spec.n_groups,
            hook_name=config.hook_name,
        )
    ).to(torch.device(config.device))


def _init_sample(
    spec: MethodSpec, store: ActivationStore, config: TrainingConfig
) -> Float[Tensor, "n d_in"] | None:
    """The activations the data-driven inits read: drawn with their own seed, apart from the
    training stream, the same for `codebook` and `codebook_saelens` (None for "random")."""
    if spec.codebook_init == "random":
        return None
    assert spec.d_sae is not None
    num_codes = spec.d_sae // spec.n_groups
    sample = store.sample(
        config.hook_name,
        max(config.init_tokens, num_codes),
        seed=config.seed + 1,
        exclude_token_ids=config.excluded,
    )
    if sample.shape[0] < num_codes:
        raise ValueError(
            f"{spec.name}: {spec.codebook_init} init needs at least {num_codes} tokens, the store "
            f"has {sample.shape[0]} usable ones."
        )
    return sample.to(torch.device(config.device))


def initial_codebook(
    spec: MethodSpec, store: ActivationStore, config: TrainingConfig
) -> tuple[Codebook, int]:
    """(a codebook for `spec` with the codes the trainer starts `codebook` from, tokens read).

    The one initialisation (`training.codebook_init.initialise_codebook`) with the trainer's own
    seed for the site, on `_init_sample`'s activations: `codebook_saelens` starts from exactly
    the codes our trainer starts `codebook` from.
    """
    from tl_codebook.training.codebook_init import initialise_codebook, site_seed

    spec = spec.resolved(config, store.d_in(config.hook_name))
    codebook = _new_codebook(spec, store.d_in(config.hook_name), config)
    sample = _init_sample(spec, store, config)
    initialise_codebook(
        codebook,
        sample,
        spec.codebook_init,
        seed=site_seed(config.seed, _codebook_site(config)),
        kmeans_iters=config.kmeans_iters,
    )
    return codebook, 0 if sample is None else sample.shape[0]


def train_method(
    spec: MethodSpec,
    store: ActivationStore,
    config: TrainingConfig,
    save_dir: str | Path | None = None,
) -> TrainedMethod:
    """Train one method on `store` with the matched budget of `config`; save it to `save_dir`.

    Codebooks are saved as a `Codebook` (cfg.json + codebook.safetensors), SAELens methods as
    SAELens inference SAEs (cfg.json + sae_weights.safetensors, `SAE.load_from_disk`); either
    directory is written under a temporary name and swapped in whole.

    Args:
        spec: the method (its unset sizes and lr come from `config`).
        store: the activations, read at `config.hook_name`.
        config: the matched training budget.
        save_dir: where to save the trained method; None saves nothing.

    Returns:
        The `TrainedMethod`, with its training tokens and time.

    Raises:
        StoreError: if the store has no activations at `config.hook_name`, or no usable token.
        ValueError: for sizes that do not fit (see `MethodSpec.resolved`), or a store with
            fewer usable tokens than a data-driven codebook init needs.
    """
    store.check_hook(config.hook_name)
    spec = spec.resolved(config, store.d_in(config.hook_name))
    if spec.kind == "codebook":
        method = _train_codebook(spec, store, config)
        if save_dir is not None:
            assert method.codebook is not None
            with atomic_directory(save_dir) as where:
                method.codebook.save(where)
        return method
    return _train_with_saelens(spec, store, config, save_dir)


def _train_codebook(
    spec: MethodSpec, store: ActivationStore, config: TrainingConfig
) -> TrainedMethod:
    """The codebook reconstruction objective on the store's activations, trained by the one
    trainer (`train_codebooks_on_activations`): only the codes learn, with SAETrainer's settings
    (Adam, constant lr, gradient norm clipped at 1, SAELens' MSE) for a matched comparison."""
    from tl_codebook.training import TrainConfig, train_codebooks_on_activations
    from tl_codebook.training.codebook_init import initialise_codebook, site_seed

    assert spec.lr is not None and spec.name is not None
    d_in = store.d_in(config.hook_name)
    codebook = _new_codebook(spec, d_in, config)
    sample = _init_sample(spec, store, config)
    seed = site_seed(config.seed, _codebook_site(config))
    if sample is None:  # the trainer keeps a codebook's codes under "random": seed them here
        initialise_codebook(codebook, None, "random", seed=seed)
    steps = math.ceil(config.training_tokens / config.batch_size)
    batches = _training_batches(store, config, config.device)
    result = train_codebooks_on_activations(
        {_codebook_site(config): codebook},
        itertools.chain([] if sample is None else [sample], batches),
        TrainConfig(
            mode="frozen",
            steps=steps,
            batch_size=config.batch_size,
            lr=spec.lr,
            codebook_weight_decay=0.0,
            schedule="constant",
            grad_clip=1.0,
            mse_reduction="sum_over_dims",
            codebook_init=spec.codebook_init,
            init_batches=1,
            kmeans_iters=config.kmeans_iters,
            seed=config.seed,
            log_every=max(1, steps // 10),
            progress=config.progress,
        ),
    )
    codebook.eval()
    method = as_method(codebook, name=spec.name, hook_name=config.hook_name, kind=spec.kind)
    method.train_tokens, method.train_seconds = result.tokens, result.seconds
    method.init_tokens, method.init_seconds, method.spec = (
        result.init_tokens,
        result.init_seconds,
        spec,
    )
    return method


def _training_sae(spec: MethodSpec, d_in: int, config: TrainingConfig) -> Any:
    """A fresh SAELens training SAE for `spec` (metadata names the hook)."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    from tl_codebook.comparisons.saelens import CodebookTrainingSAE, CodebookTrainingSAEConfig

    common = dict(
        d_in=d_in,
        d_sae=spec.d_sae,
        dtype="float32",
        device=config.device,
        metadata=SAEMetadata(hook_name=config.hook_name),
    )
    if spec.kind == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=spec.k, **common))  # type: ignore[arg-type]
    if spec.kind == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=spec.k, **common))  # type: ignore[arg-type]
    if spec.kind == "standard":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient, **common)  # type: ignore[arg-type]
        )
    if spec.kind == "jumprelu":
        return JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(l0_coefficient=spec.l0_coefficient, **common)  # type: ignore[arg-type]
        )
    if spec.kind == "codebook_saelens":
        return CodebookTrainingSAE(
            CodebookTrainingSAEConfig(
                k=spec.k,  # type: ignore[arg-type]
                n_groups=spec.n_groups,
                similarity=spec.similarity,
                **common,  # type: ignore[arg-type]
            )
        )
    raise ValueError(f"{spec.kind!r} is not trained by SAELens; valid: {', '.join(METHOD_KINDS)}.")


def _fit(trainer: Any, name: str, progress: bool) -> Any:
    """`SAETrainer.fit` through its public seams (`maybe_reset_sparsity`, `step`,
    `set_final_sae_metadata`, as SAELens' own `MultiSAETrainer` drives it), with our progress
    bar: `fit` always draws its own bar, which cannot be turned off. Only what `fit` does for our
    settings (no wandb, no checkpoints, no activation normalisation) is needed."""
    cfg = trainer.cfg
    if trainer.sae.cfg.normalize_activations != "none":
        raise ValueError(
            f"{name}: SAELens' activation normalisation is not supported here (got "
            f"{trainer.sae.cfg.normalize_activations!r})."
        )
    trainer.sae.to(cfg.device)
    bar = tqdm(
        total=cfg.total_training_samples,
        desc=f"train {name}",
        disable=not progress,
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
    )
    while trainer.n_training_samples < cfg.total_training_samples:
        trainer.maybe_reset_sparsity()
        output = trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
        bar.update(trainer.n_training_samples - bar.n)
        if trainer.n_training_steps % 20 == 1:
            bar.set_postfix(loss=f"{float(output.loss.detach()):.4g}")
    bar.close()
    trainer.set_final_sae_metadata()
    return trainer.sae


def _train_with_saelens(
    spec: MethodSpec,
    store: ActivationStore,
    config: TrainingConfig,
    save_dir: str | Path | None,
) -> TrainedMethod:
    """SAELens' own `SAETrainer` on our token stream; the result reloaded as an inference SAE."""
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training import sae_trainer

    assert spec.lr is not None and spec.name is not None
    d_in = store.d_in(config.hook_name)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    sae = _training_sae(spec, d_in, config)
    init_tokens = 0
    if spec.kind == "codebook_saelens":
        codebook, init_tokens = initial_codebook(spec, store, config)
        with torch.no_grad():
            sae.codes.copy_(codebook.codes)
    init_seconds = time.perf_counter() - started
    steps = math.ceil(config.training_tokens / config.batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=config.training_tokens,
        train_batch_size_samples=config.batch_size,
        lr=spec.lr,
        lr_end=spec.lr,  # SAETrainer asserts it is set; constant schedule
        device=config.device,
        dead_feature_window=config.dead_feature_window or max(1, min(1000, steps // 10)),
        feature_sampling_window=max(1, min(2000, steps)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = _training_batches(store, config, config.device)
    trainer = sae_trainer.SAETrainer(trainer_cfg, sae, data)
    started = time.perf_counter()
    trained = _fit(trainer, spec.name, config.progress)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        with atomic_directory(save_dir or Path(scratch) / "sae") as where:
            trained.save_inference_model(where)
        inference = SAE.load_from_disk(str(save_dir or Path(scratch) / "sae"), device=config.device)
    method = as_method(inference, name=spec.name, hook_name=config.hook_name, kind=spec.kind)
    method.train_tokens, method.train_seconds = data.tokens, seconds
    method.init_tokens, method.init_seconds, method.spec = init_tokens, init_seconds, spec
    return method
