"""SD4Match learned prompts (paper Sec. 3.2-3.3): SD4Match-Single, SD4Match-Class and SD4Match-CPM.

Every module outputs ``(B, 77, D)`` CLIP *input* embeddings ``[SOS, learned..., EOS]`` for
``sd4match.prompts.encode_sequence``; only the prompt is trainable, the text encoder and its token/position
tables stay frozen and are never held by the module (SOS/EOS are copied into non-persistent buffers).
Saved prompts are a safetensors file of the learned parameters plus a JSON sidecar ``<file>.json``.
A prompt shorter than the 75 learned positions (Fig. 3a case 5, CPM without its global prompt) is framed as
the authors' code frames it: ``[SOS, learned, EOS, padding]``, EOS right after the learned vectors and the
rest filled with token id 0, every position with its own positional embedding.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from sd4match.io import write_json_atomic
from sd4match.prompts import (
    hidden_size,
    position_embeddings,
    sequence_length,
    sos_eos_embeddings,
    token_embeddings,
)
from sd4match.tensor_files import save_tensors

log = logging.getLogger(__name__)

VARIANTS = ("single", "class", "cpm")
CONDITIONS = ("pair", "individual")
FEATURES = ("local", "global")
SIDECAR_FORMAT = "sd4match-prompt"
SIDECAR_VERSION = 1
SIDECAR_KEYS = ("format", "version", "variant", "categories", "cpm", "hidden_size", "seed", "metadata")
PROMPT_SUFFIX = ".safetensors"
LR_PROMPT = 1e-2
LR_LINEAR = 1e-3
# The authors' CPM pads a prompt shorter than 75 learned vectors with token id 0 after its EOS (``"!"``, the
# pad token of SD 2-1's tokenizer).
PAD_TOKEN_ID = 0
# ClassPrompt tensors are ``prompts.<i>``, one per category, i its index in the sidecar's sorted category list
# (category names cannot be the keys: "train" is an SPair category and an nn.Module method).
CLASS_PARAMETERS = "prompts"


@dataclass
class PromptBatch:
    """What a prompt needs for a batch of B pairs: categories, DINOv2 patch tokens and global descriptors.

    Tokens are ``(B, N_patches, D_dino)`` (CLS dropped), descriptors ``(B, D_dino)``; only CPM reads them.
    """

    categories: list[str]
    src_tokens: Tensor | None = None
    trg_tokens: Tensor | None = None
    src_global: Tensor | None = None
    trg_global: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.categories, str) or not all(isinstance(c, str) for c in self.categories):
            raise ValueError(f"PromptBatch.categories must be a list of strings, got {self.categories!r}")
        self.categories = list(self.categories)
        for name in ("src_tokens", "trg_tokens", "src_global", "trg_global"):
            value = getattr(self, name)
            if value is not None and (value.ndim < 1 or value.shape[0] != len(self.categories)):
                raise ValueError(
                    f"PromptBatch.{name}: batch size {tuple(value.shape)[:1]} does not match "
                    f"{len(self.categories)} categories"
                )

    @property
    def size(self) -> int:
        """Number of pairs B."""
        return len(self.categories)


@dataclass
class CPMConfig:
    """Design of the conditional prompting module; the Fig. 3a ablations are its non-default settings.

    ``condition``: "pair" (source and target fused, one shared prompt) or "individual" (one prompt per image);
    ``features``: "local" (DINOv2 patch tokens) or "global" (the image descriptor as one token).
    ``use_gn``: the patch-mixing layer g_n; None (the default) resolves to the authors' modules, which have
    it only for pair + local features (protocol.md "Fig. 3a modules"); False on pair + local is case 6; True
    elsewhere is none of the authors' modules (prompts of cases 2-4 saved before this fix had it).
    ``global_prompt``: False is case 5, the n_cond conditional vectors alone, padded as the authors do.
    """

    condition: str = "pair"
    features: str = "local"
    global_prompt: bool = True
    use_gn: bool | None = None
    n_global: int = 25
    n_cond: int = 50
    dino_dim: int = 768
    n_patches: int = 256

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"CPMConfig.condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.features not in FEATURES:
            raise ValueError(f"CPMConfig.features must be one of {FEATURES}, got {self.features!r}")
        if self.use_gn is None:
            self.use_gn = self.condition == "pair" and self.features == "local"
        for name in ("global_prompt", "use_gn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CPMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("n_global", "n_cond", "dino_dim", "n_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CPMConfig.{name} must be a positive integer, got {value!r}")

    @property
    def cond_length(self) -> int:
        """Length of theta_cond: n_cond, with or without the global prompt (the authors' ``C50``)."""
        return self.n_cond

    @property
    def learned_length(self) -> int:
        """Learned vectors between SOS and EOS: n_global + n_cond, or n_cond without the global prompt."""
        return self.n_cond + (self.n_global if self.global_prompt else 0)

    @property
    def input_tokens(self) -> int:
        """Patch-axis length N of the conditioning input: n_patches (local) or 1 (global descriptor)."""
        return self.n_patches if self.features == "local" else 1

    @property
    def input_dim(self) -> int:
        """Channels of the conditioning input: 2 * dino_dim for a pair (concatenated), dino_dim alone."""
        return 2 * self.dino_dim if self.condition == "pair" else self.dino_dim


def cpm_config_from_dict(data: Any, where: str) -> CPMConfig:
    """CPMConfig from a JSON object; unknown/missing keys or bad values raise naming ``where``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: CPM config must be a JSON object, got {type(data).__name__}")
    expected = {f.name for f in fields(CPMConfig)}
    extra = sorted(data.keys() - expected)
    if extra:
        raise ValueError(f"{where}: unknown CPM config keys {extra}")
    try:
        return CPMConfig(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


class LearnedPrompt(nn.Module, abc.ABC):
    """Base of the learned prompts: frames learned vectors as ``[SOS, learned, EOS]`` (B, 77, D).

    SOS (token + positional embedding of position 0) and the tail after the L learned vectors (EOS at position
    L + 1, then padding: ``tail_embeddings``) are frozen copies held as non-persistent buffers: they follow
    ``.to()`` but are neither parameters nor saved. L = 75 for every prompt but CPM without its global prompt.
    """

    variant: ClassVar[str]
    needs_dino: ClassVar[bool]
    per_image: ClassVar[bool]

    def __init__(
        self, text_encoder: nn.Module, tokenizer: Any, seed: int, learned_length: int | None = None
    ) -> None:
        super().__init__()
        self.seed = seed
        self.hidden_size = hidden_size(text_encoder)
        self.sequence_length = sequence_length(text_encoder)
        self.n_learned = self.sequence_length - 2
        self.learned_length = self.n_learned if learned_length is None else learned_length
        if not 1 <= self.learned_length <= self.n_learned:
            raise ValueError(
                f"{self.variant}: {self.learned_length} learned vectors do not fit the {self.n_learned} "
                "positions between SOS and EOS"
            )
        with torch.no_grad():
            sos, _ = sos_eos_embeddings(text_encoder, tokenizer)
            tail = tail_embeddings(text_encoder, tokenizer, self.learned_length)
        self.register_buffer("sos", sos.detach().clone().float(), persistent=False)
        self.register_buffer("tail", tail.detach().clone().float(), persistent=False)

    def frame(self, learned: Tensor) -> Tensor:
        """``[SOS, learned, EOS, padding]`` along the sequence axis: (B, L, D) -> (B, 77, D)."""
        expected = (self.learned_length, self.hidden_size)
        if learned.ndim != 3 or tuple(learned.shape[1:]) != expected:
            raise ValueError(
                f"{self.variant}: learned part must be (B, {expected[0]}, {expected[1]}), "
                f"got {tuple(learned.shape)}"
            )
        batch = learned.shape[0]
        sos = self.sos.to(learned.dtype).expand(batch, 1, self.hidden_size)
        tail = self.tail.to(learned.dtype).expand(batch, -1, -1)
        return torch.cat([sos, learned, tail], dim=1)

    @abc.abstractmethod
    def prompt_pair(self, batch: PromptBatch) -> tuple[Tensor, Tensor]:
        """(source, target) prompt input embeddings, each (B, 77, D)."""

    def forward(self, batch: PromptBatch) -> tuple[Tensor, Tensor]:
        """Same as ``prompt_pair`` (the nn.Module call convention)."""
        return self.prompt_pair(batch)

    def parameter_groups(self, lr: float = LR_PROMPT, lr_linear: float = LR_LINEAR) -> list[dict[str, Any]]:
        """Optimiser parameter groups: one group at ``lr`` (``lr_linear`` only matters for CPM)."""
        return [{"name": "prompt", "params": list(self.parameters()), "lr": lr}]

    def sidecar(self) -> dict[str, Any]:
        """What ``load_prompt`` needs to rebuild this module (variant, categories, CPM config, D)."""
        return {"variant": self.variant, "categories": None, "cpm": None, "hidden_size": self.hidden_size}

    def upgrade_state(self, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """Saved tensors in an earlier on-disk layout as this module's state dict (no earlier layout here)."""
        return tensors


def tail_embeddings(text_encoder: nn.Module, tokenizer: Any, learned_length: int) -> Tensor:
    """What follows L learned vectors, as the authors' code builds it: EOS at position L + 1, then token id
    ``PAD_TOKEN_ID`` at positions L + 2 .. 76, each with its positional embedding: (76 - L, D).

    For L = 75 this is the single EOS row of ``sos_eos_embeddings``.
    """
    positions = position_embeddings(text_encoder)
    count = positions.shape[0] - 1 - learned_length
    ids = torch.tensor([int(tokenizer.eos_token_id)] + [PAD_TOKEN_ID] * (count - 1))
    return token_embeddings(text_encoder, ids) + positions[learned_length + 1 :]


def random_vocabulary_ids(vocab_size: int, excluded: set[int], shape: tuple[int, ...], seed: int) -> Tensor:
    """Token ids drawn uniformly from ``[0, vocab_size)`` minus ``excluded`` with a seeded generator."""
    allowed = torch.tensor([i for i in range(vocab_size) if i not in excluded], dtype=torch.long)
    if allowed.numel() == 0:
        raise ValueError(
            f"random_vocabulary_ids: no ids left in [0, {vocab_size}) after excluding {excluded}"
        )
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(allowed.numel(), shape, generator=generator)]


def initial_prompts(text_encoder: nn.Module, tokenizer: Any, count: int, seed: int) -> Tensor:
    """``count`` prompt initialisations (count, 75, D): random token embeddings + positions 1..75.

    Ids come from the whole embedding table except SOS and EOS (protocol.md "Prompts").
    """
    positions = position_embeddings(text_encoder)
    n_learned = positions.shape[0] - 2
    vocab_size = int(text_encoder.get_input_embeddings().num_embeddings)
    excluded = {int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)}
    ids = random_vocabulary_ids(vocab_size, excluded, (count, n_learned), seed)
    with torch.no_grad():
        init = token_embeddings(text_encoder, ids) + positions[1 : 1 + n_learned]
    return init.detach().clone().float()


class CategoryPrompt(LearnedPrompt):
    """Prompts that depend only on an image's category (Single, Class): features once per distinct image."""

    needs_dino: ClassVar[bool] = False
    per_image: ClassVar[bool] = True

    @abc.abstractmethod
    def learned_for(self, categories: list[str]) -> Tensor:
        """The learned vectors (B, 75, D) for ``categories``."""

    def prompt_for_images(self, categories: list[str]) -> Tensor:
        """Prompt input embeddings (B, 77, D) of images with these categories."""
        if isinstance(categories, str):
            raise ValueError(f"{self.variant}: categories must be a list of strings, got {categories!r}")
        return self.frame(self.learned_for(list(categories)))

    def embeddings(self, categories: list[str]) -> Tensor:
        """``prompt_for_images``: lets a learned prompt stand in for a ``sd4match.prompts.PromptSource``."""
        return self.prompt_for_images(categories)

    def prompt_pair(self, batch: PromptBatch) -> tuple[Tensor, Tensor]:
        """The same prompt for source and target (both images are of the pair's category)."""
        prompt = self.prompt_for_images(batch.categories)
        return prompt, prompt


class SinglePrompt(CategoryPrompt):
    """SD4Match-Single: one universal learned prompt theta (75, D) for every image."""

    variant: ClassVar[str] = "single"

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, seed: int = 0) -> None:
        super().__init__(text_encoder, tokenizer, seed)
        init = initial_prompts(text_encoder, tokenizer, 1, seed)[0]
        self.prompt = nn.Parameter(init.to(self.sos.device))

    def learned_for(self, categories: list[str]) -> Tensor:
        """The one prompt, expanded to (B, 75, D)."""
        return self.prompt.unsqueeze(0).expand(len(categories), -1, -1)


class ClassPrompt(CategoryPrompt):
    """SD4Match-Class: one learned prompt theta_i (75, D) per object category (Eq. 6).

    Each category is its own parameter (``prompts.<i>``, i its index in ``categories``), as in the authors'
    code: a category absent from a batch gets no gradient, so Adam leaves it untouched (one stacked tensor
    would let Adam's moment estimates move every category at every step).
    """

    variant: ClassVar[str] = "class"

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, categories: list[str], seed: int = 0) -> None:
        super().__init__(text_encoder, tokenizer, seed)
        if isinstance(categories, str) or not categories:
            raise ValueError(f"ClassPrompt: categories must be a non-empty list of names, got {categories!r}")
        self.categories = sorted(set(categories))
        self.index = {name: i for i, name in enumerate(self.categories)}
        init = initial_prompts(text_encoder, tokenizer, len(self.categories), seed).to(self.sos.device)
        self.prompts = nn.ParameterList([nn.Parameter(row.clone()) for row in init])

    def prompt_of(self, category: str) -> nn.Parameter:
        """The learned vectors (75, D) of one category; an unknown category raises naming it."""
        self.require_known([category])
        return self.prompts[self.index[category]]

    def require_known(self, categories: list[str]) -> None:
        """Raise naming every category this prompt has no prompt for."""
        unknown = sorted({c for c in categories if c not in self.index})
        if unknown:
            raise ValueError(
                f"ClassPrompt: unknown categories {unknown}; this prompt knows {self.categories}"
            )

    def learned_for(self, categories: list[str]) -> Tensor:
        """Theta(c(I)) for each image category: (B, 75, D)."""
        self.require_known(categories)
        return torch.stack([self.prompts[self.index[name]] for name in categories])

    def state_for(self, learned: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state dict of this module from category -> learned vectors (75, D), one tensor per category."""
        return {f"{CLASS_PARAMETERS}.{i}": learned[name] for i, name in enumerate(self.categories)}

    def upgrade_state(self, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """Tensors saved before one parameter per category (``prompts`` stacked (C, 75, D) in sorted category
        order) as this module's per-category tensors; anything else is returned unchanged."""
        stacked = tensors.get(CLASS_PARAMETERS)
        if stacked is None or set(tensors) != {CLASS_PARAMETERS}:
            return tensors
        if stacked.ndim != 3 or stacked.shape[0] != len(self.categories):
            raise ValueError(
                f"{where}: stacked Class prompt {tuple(stacked.shape)} does not have one row per category of "
                f"its sidecar ({len(self.categories)}: {self.categories})"
            )
        return self.state_for(dict(zip(self.categories, stacked.unbind(0), strict=True)))

    def sidecar(self) -> dict[str, Any]:
        """Sidecar fields, with the sorted category list (the names of the ``prompts.<category>`` tensors)."""
        return {**super().sidecar(), "categories": list(self.categories)}


class ConditionalPromptModule(LearnedPrompt):
    """SD4Match-CPM (Sec. 3.3, Fig. 2): a global prompt followed by a prompt conditioned on DINOv2 features.

    theta_cond = (p(g_n(g_d(F))) + Omega_pos) * tanh(Omega_alpha), the authors' code (protocol.md), which
    produced the paper's numbers; the paper writes F_hat * Omega_alpha + Omega_pos. The Fig. 3a variants are
    the authors' modules: individual images' patch tokens go through g_d and the pooling p only; a global
    descriptor (one token) through g_d only, broadcast over the n_cond positions; g_n exists only where
    ``CPMConfig.use_gn`` says (by default pair + local). Without the global prompt (case 5) the n_cond
    conditional vectors are followed by EOS and padding (``tail_embeddings``).
    """

    variant: ClassVar[str] = "cpm"
    needs_dino: ClassVar[bool] = True
    per_image: ClassVar[bool] = False

    def __init__(
        self, text_encoder: nn.Module, tokenizer: Any, config: CPMConfig | None = None, seed: int = 0
    ) -> None:
        cfg = CPMConfig() if config is None else config
        available = sequence_length(text_encoder) - 2
        if cfg.learned_length > available:
            used = f"CPMConfig.n_global ({cfg.n_global}) + " if cfg.global_prompt else ""
            raise ValueError(
                f"{used}CPMConfig.n_cond ({cfg.n_cond}) exceed the {available} learned positions of the text "
                "encoder"
            )
        super().__init__(text_encoder, tokenizer, seed, learned_length=cfg.learned_length)
        self.config = cfg
        width = self.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.g_d = nn.Linear(cfg.input_dim, width)
            self.g_n = nn.Linear(cfg.input_tokens, cfg.input_tokens) if cfg.use_gn else None
            self.global_prompt = nn.Parameter(torch.rand(cfg.n_global, width)) if cfg.global_prompt else None
            self.omega_pos = nn.Parameter(torch.rand(cfg.cond_length, width))
            self.omega_alpha = nn.Parameter(torch.rand(cfg.cond_length, width))
        self.to(self.sos.device)

    def conditioning_input(self, batch: PromptBatch, side: str) -> Tensor:
        """F of one image (``side`` "src"/"trg"): tokens (B, N, D_dino) or the descriptor (B, 1, D_dino)."""
        cfg = self.config
        name = f"{side}_tokens" if cfg.features == "local" else f"{side}_global"
        value = getattr(batch, name)
        expected = (cfg.n_patches, cfg.dino_dim) if cfg.features == "local" else (cfg.dino_dim,)
        if value is None:
            raise ValueError(f"CPM ({cfg.condition}, {cfg.features}): PromptBatch.{name} is required")
        if tuple(value.shape[1:]) != expected:
            raise ValueError(
                f"CPM: PromptBatch.{name} must be (B, {', '.join(map(str, expected))}), "
                f"got {tuple(value.shape)}"
            )
        value = value.to(device=self.omega_pos.device, dtype=self.omega_pos.dtype)
        return value if cfg.features == "local" else value.unsqueeze(1)

    def condition(self, inputs: Tensor) -> Tensor:
        """theta_cond (B, n_cond, D) from the fused or single-image features (B, N, C): patch tokens are
        max-pooled to n_cond, a global descriptor's one token is broadcast over the n_cond positions."""
        hidden = self.g_d(inputs)
        if self.g_n is not None:
            hidden = self.g_n(hidden.transpose(1, 2)).transpose(1, 2)
        if self.config.features == "local":
            hidden = F.adaptive_max_pool1d(hidden.transpose(1, 2), self.config.cond_length).transpose(1, 2)
        return (hidden + self.omega_pos) * torch.tanh(self.omega_alpha)

    def assemble(self, cond: Tensor) -> Tensor:
        """``[SOS, theta_global, theta_cond, EOS]`` (B, 77, D); without the global prompt
        ``[SOS, theta_cond, EOS, padding]``."""
        if self.global_prompt is None:
            return self.frame(cond)
        head = self.global_prompt.unsqueeze(0).expand(cond.shape[0], -1, -1)
        return self.frame(torch.cat([head, cond], dim=1))

    def prompt_pair(self, batch: PromptBatch) -> tuple[Tensor, Tensor]:
        """Pair mode: one prompt theta^AB for both images (Eq. 7); individual mode: theta^A and theta^B."""
        src = self.conditioning_input(batch, "src")
        trg = self.conditioning_input(batch, "trg")
        if self.config.condition == "pair":
            prompt = self.assemble(self.condition(torch.cat([src, trg], dim=-1)))
            return prompt, prompt
        return self.assemble(self.condition(src)), self.assemble(self.condition(trg))

    def linear_parameters(self) -> list[nn.Parameter]:
        """Parameters of g_d and g_n (trained at the lower learning rate)."""
        layers = [self.g_d] + ([] if self.g_n is None else [self.g_n])
        return [p for layer in layers for p in layer.parameters()]

    def parameter_groups(self, lr: float = LR_PROMPT, lr_linear: float = LR_LINEAR) -> list[dict[str, Any]]:
        """Two groups (Sec. 4.1): g_d and g_n at ``lr_linear`` (1e-3), the prompts at ``lr`` (1e-2)."""
        linear_ids = {id(p) for p in self.linear_parameters()}
        prompt = [p for p in self.parameters() if id(p) not in linear_ids]
        return [
            {"name": "prompt", "params": prompt, "lr": lr},
            {"name": "linear", "params": self.linear_parameters(), "lr": lr_linear},
        ]

    def sidecar(self) -> dict[str, Any]:
        """Sidecar fields, with the CPM config."""
        return {**super().sidecar(), "cpm": asdict(self.config)}


def build_prompt_module(
    variant: str,
    text_encoder: nn.Module,
    tokenizer: Any,
    categories: list[str] | None = None,
    cpm: CPMConfig | None = None,
    seed: int = 0,
) -> LearnedPrompt:
    """A freshly initialised learned prompt of ``variant`` ("single", "class" or "cpm")."""
    if variant not in VARIANTS:
        raise ValueError(f"build_prompt_module: variant must be one of {VARIANTS}, got {variant!r}")
    if cpm is not None and variant != "cpm":
        raise ValueError(f"build_prompt_module: a CPM config was given for variant {variant!r}")
    if categories is not None and variant != "class":
        raise ValueError(f"build_prompt_module: categories only apply to variant 'class', not {variant!r}")
    if variant == "single":
        return SinglePrompt(text_encoder, tokenizer, seed=seed)
    if variant == "class":
        if categories is None:
            raise ValueError("build_prompt_module: variant 'class' needs the list of categories")
        return ClassPrompt(text_encoder, tokenizer, categories, seed=seed)
    return ConditionalPromptModule(text_encoder, tokenizer, cpm, seed=seed)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a saved prompt: ``<path>.json``."""
    return Path(f"{path}.json")


def _require_suffix(path: Path) -> None:
    """Prompt files are safetensors; any other suffix is an error naming the path."""
    if path.suffix != PROMPT_SUFFIX:
        raise ValueError(f"prompt file {path} must end with {PROMPT_SUFFIX}")


def save_prompt(module: LearnedPrompt, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write the learned parameters to ``path`` (safetensors) and the rebuild info + ``metadata`` beside it.

    ``metadata`` (training set, step, config hash, model revisions...) must be JSON-serialisable.
    """
    target = Path(path)
    _require_suffix(target)
    if not isinstance(metadata, dict):
        raise ValueError(f"save_prompt {target}: metadata must be a dict, got {type(metadata).__name__}")
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        **module.sidecar(),
        "seed": int(module.seed),
        "metadata": metadata,
    }
    try:
        json.dumps(sidecar)
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_prompt {target}: metadata is not JSON-serialisable ({error})") from error
    tensors = {
        name: tensor.detach().float().cpu().contiguous() for name, tensor in module.state_dict().items()
    }
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise FloatingPointError(f"save_prompt {target}: parameters {bad} are not finite; nothing written")
    save_tensors(tensors, target, metadata={"format": SIDECAR_FORMAT, "variant": module.variant})
    write_json_atomic(sidecar_path(target), sidecar)


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The validated JSON sidecar of the prompt file ``path``; problems raise naming the sidecar."""
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"prompt sidecar {side} does not exist (written by save_prompt beside {path})"
        )
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"prompt sidecar {side}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"prompt sidecar {side}: expected a JSON object, got {type(data).__name__}")
    missing = [key for key in SIDECAR_KEYS if key not in data]
    if missing:
        raise ValueError(f"prompt sidecar {side}: missing keys {missing}")
    if data["format"] != SIDECAR_FORMAT or data["version"] != SIDECAR_VERSION:
        raise ValueError(
            f"prompt sidecar {side}: format {data['format']!r} version {data['version']!r}, expected "
            f"{SIDECAR_FORMAT!r} version {SIDECAR_VERSION}"
        )
    if data["variant"] not in VARIANTS:
        raise ValueError(
            f"prompt sidecar {side}: key 'variant' must be one of {VARIANTS}, got {data['variant']!r}"
        )
    if not isinstance(data["metadata"], dict):
        raise ValueError(f"prompt sidecar {side}: key 'metadata' must be a JSON object")
    return data


def module_from_sidecar(
    data: dict[str, Any], text_encoder: nn.Module, tokenizer: Any, where: str
) -> LearnedPrompt:
    """Rebuild an (untrained) prompt module as described by a sidecar; mismatches raise naming ``where``."""
    width = hidden_size(text_encoder)
    if data["hidden_size"] != width:
        raise ValueError(
            f"{where}: prompt has hidden size {data['hidden_size']} but the text encoder has {width}"
        )
    cpm = None if data["cpm"] is None else cpm_config_from_dict(data["cpm"], where)
    try:
        return build_prompt_module(
            data["variant"],
            text_encoder,
            tokenizer,
            categories=data["categories"],
            cpm=cpm,
            seed=int(data["seed"]),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot rebuild the prompt module ({error})") from error


def upgrade_cpm_sidecar(data: dict[str, Any], tensors: Mapping[str, Tensor], where: str) -> dict[str, Any]:
    """The sidecar of a CPM saved before case 5 followed the authors' code (no global prompt: n_global +
    n_cond conditional vectors filled all 75 positions) rewritten to describe that module exactly
    (``n_cond`` = its conditional length); any other sidecar is returned unchanged."""
    cpm = data.get("cpm")
    omega = tensors.get("omega_pos")
    if data.get("variant") != "cpm" or not isinstance(cpm, dict) or cpm.get("global_prompt") is not False:
        return data
    if omega is None or omega.ndim != 2 or omega.shape[0] == cpm.get("n_cond"):
        return data
    if omega.shape[0] != cpm.get("n_global", 0) + cpm.get("n_cond", 0):
        return data
    log.warning(
        "%s: CPM without global prompt saved with %d conditional vectors (the earlier case-5 layout); loaded "
        "as n_cond=%d, exactly the module it was trained as",
        where,
        omega.shape[0],
        omega.shape[0],
    )
    return {**data, "cpm": {**cpm, "n_cond": int(omega.shape[0])}}


def load_prompt(
    path: str | Path, text_encoder: nn.Module, tokenizer: Any
) -> tuple[LearnedPrompt, dict[str, Any]]:
    """Rebuild a saved prompt module from its sidecar and load its weights strictly: (module, metadata).

    Files of earlier layouts load as the module they were trained as: a Class prompt stacked in one tensor
    (``ClassPrompt.upgrade_state``) and a CPM without global prompt of 75 conditional vectors
    (``upgrade_cpm_sidecar``).
    """
    source = Path(path)
    _require_suffix(source)
    if not source.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist")
    data = read_sidecar(source)
    try:
        tensors = load_file(str(source))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"prompt file {source}: unreadable safetensors ({error})") from error
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"prompt file {source}: parameters {bad} hold NaN/inf values; retrain the prompt")
    data = upgrade_cpm_sidecar(data, tensors, str(source))
    module = module_from_sidecar(data, text_encoder, tokenizer, str(sidecar_path(source)))
    tensors = module.upgrade_state(tensors, f"prompt file {source}")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"prompt file {source} does not match its sidecar {sidecar_path(source)}: {error}"
        ) from error
    return module, data["metadata"]
