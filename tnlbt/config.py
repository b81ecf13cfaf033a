"""Typed configuration: frozen dataclasses, YAML presets, ``key=value`` overrides, validation.

A config is a tree of frozen dataclasses. It crosses process boundaries (Ray workers, checkpoints) as a
plain dict / JSON and is rebuilt with :func:`Config.from_dict` at once; it is never pickled.

Validation happens in two layers:
* the loader checks every key against the dataclass fields (an unknown key names the allowed ones) and
  every value against its annotation (``Literal`` choices are listed in the message);
* each section's ``__post_init__`` checks ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class DataConfig:
    """Where data lives and how Recipe1M (or the offline generator's output) is turned into Parquet."""

    raw_dir: str = "data/synth"  # Recipe1M layout: layer1.json, layer2.json, det_ingrs.json, images tree
    image_root: str = ""  # image tree root; "" means {raw_dir}/images
    processed_dir: str = "data/processed"
    # Text, as H-T: <start> w1 .. wn <end>, truncated to the limits below.
    max_title_tokens: int = 15
    max_ingredients: int = 20
    max_instructions: int = 20
    max_line_tokens: int = 15
    min_word_count: int = 10  # H-T keeps words seen >= 10 times in paired train recipes
    min_ingredient_count: int = 1  # cleaned ingredient names (det_ingrs.json) kept for the multi-label head
    # Images
    image_short_side: int = 256  # stored size (shorter side), JPEG bytes in Parquet
    image_jpeg_quality: int = 90
    max_images_per_recipe: int = 5
    max_image_pixels: int = 64_000_000  # decompression-bomb limit
    min_image_side: int = 16  # photos with a shorter side below this are rejected (too_small)
    max_image_aspect: float = 10.0  # long/short side above this is rejected (resizing would explode it)
    row_group_rows: int = 256  # Parquet row group size inside each file (random access reads one group)
    rows_per_file: int = 2048  # max Parquet rows per output file (one preprocessing task writes one file)
    preprocess_cpus: float = 0.0  # logical CPUs for Ray Data (0 = all)

    def __post_init__(self) -> None:
        for name in ("max_title_tokens", "max_ingredients", "max_instructions", "max_line_tokens"):
            _check(getattr(self, name) >= 3, f"data.{name}", "must be >= 3 (room for <start> w <end>)")
        _check(self.min_word_count >= 1, "data.min_word_count", "must be >= 1")
        _check(self.min_ingredient_count >= 1, "data.min_ingredient_count", "must be >= 1")
        _check(32 <= self.image_short_side <= 2048, "data.image_short_side", "must be in 32..2048")
        _check(1 <= self.image_jpeg_quality <= 100, "data.image_jpeg_quality", "must be in 1..100")
        _check(self.max_images_per_recipe >= 1, "data.max_images_per_recipe", "must be >= 1")
        _check(self.rows_per_file >= 16, "data.rows_per_file", "must be >= 16")
        _check(self.min_image_side >= 1, "data.min_image_side", "must be >= 1")
        _check(self.max_image_aspect >= 1.0, "data.max_image_aspect", "must be >= 1")
        _check(self.row_group_rows >= 1, "data.row_group_rows", "must be >= 1")
        _check(self.preprocess_cpus >= 0, "data.preprocess_cpus", "must be >= 0")

    @property
    def images_dir(self) -> str:
        return self.image_root or f"{self.raw_dir.rstrip('/')}/images"


@dataclass(frozen=True)
class ModelConfig:
    """Encoders (H-T recipe encoder, timm image encoder) and the training-only TNLBT parts."""

    embed_dim: int = 1024  # joint space D
    # Hierarchical recipe encoder (H-T): shared word embedding, 5 transformer encoders.
    text_width: int = 512
    text_layers: int = 2
    text_heads: int = 4
    text_ff_mult: int = 4
    text_max_positions: int = 50
    dropout: float = 0.1
    # Image encoder: any timm model by name, built with num_classes=0.
    image_model: str = "vit_base_patch16_224"
    image_size: int = 224
    image_pretrained: str = ""  # "" = random init; a local .safetensors/.pth path; "hub" = download (online only)
    # Cross Decoder ("fusing before generating"), training only.
    cross_decoder: bool = True
    cross_layers: int = 1
    cross_heads: int = 4
    cross_bidirectional: bool = False  # also let recipe tokens attend to image tokens
    itm_negatives: int = 1  # hard negatives per positive and direction (ALBEF: 1 each way)
    # ACME-style parts.
    adversarial: bool = True  # modality discriminator (WGAN-GP) on embeddings
    disc_hidden: int = 512
    ingredient_head: bool = True  # image -> ingredients multi-label head
    ingredient_hidden: int = 512  # ingredient head MLP: D -> h -> h/2 -> n_ingredients (ACME: 512)
    generator: bool = True  # recipe -> image conditional GAN
    gen_image_size: Literal[64, 128] = 64
    gen_channels: int = 64  # base width of generator / image discriminator
    gen_noise_dim: int = 100
    gen_cond_dim: int = 128  # conditioning-augmentation size
    gen_use_fused: bool = True  # condition the generator on the Cross Decoder's fused embedding

    def __post_init__(self) -> None:
        _check(self.embed_dim >= 8, "model.embed_dim", "must be >= 8")
        _check(self.text_width % self.text_heads == 0, "model.text_width",
               f"must be divisible by model.text_heads ({self.text_heads})")
        _check(self.text_layers >= 1, "model.text_layers", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.image_size >= 16, "model.image_size", "must be >= 16")
        _check(self.cross_layers >= 1, "model.cross_layers", "must be >= 1")
        _check(self.text_width % self.cross_heads == 0, "model.cross_heads",
               f"must divide model.text_width ({self.text_width})")
        _check(self.itm_negatives >= 1, "model.itm_negatives", "must be >= 1")
        _check(self.gen_channels >= 4, "model.gen_channels", "must be >= 4")
        _check(self.ingredient_hidden >= 2, "model.ingredient_hidden", "must be >= 2")
        _check(self.disc_hidden >= 2, "model.disc_hidden", "must be >= 2")


@dataclass(frozen=True)
class LossConfig:
    """Retrieval triplet with a margin schedule, recipe self-supervision, adversarial and translation terms."""

    triplet: Literal["ht", "valid", "hard"] = "ht"  # H-T mean over negatives | AdaMine valid | batch-hard
    margin_schedule: Literal["constant", "incremental", "adaptive"] = "incremental"
    margin: float = 0.3  # constant schedule
    margin_start: float = 0.05  # incremental: min(start + delta * epoch, max)  (T-Food)
    margin_delta: float = 0.005
    margin_max: float = 0.3
    margin_min: float = 0.05  # adaptive: clamp(max * (1 - active fraction), min, max)
    margin_per_step: bool = True  # incremental margin grows fractionally within an epoch
    w_retrieval: float = 1.0
    w_recipe_ssl: float = 1.0
    w_adv: float = 0.005  # ACME
    w_trans: float = 0.002  # ACME (image generation + ingredient prediction, balanced)
    w_itm: float = 1.0
    gp_weight: float = 10.0
    kl_weight: float = 2.0

    def __post_init__(self) -> None:
        for name in ("margin", "margin_start", "margin_delta", "margin_max", "margin_min"):
            _check(getattr(self, name) >= 0.0, f"loss.{name}", "must be >= 0")
        _check(self.margin_start <= self.margin_max, "loss.margin_start", "must be <= loss.margin_max")
        _check(self.margin_min <= self.margin_max, "loss.margin_min", "must be <= loss.margin_max")
        for name in ("w_retrieval", "w_recipe_ssl", "w_adv", "w_trans", "w_itm", "gp_weight", "kl_weight"):
            _check(getattr(self, name) >= 0.0, f"loss.{name}", "must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    backbone_lr_scale: float = 1.0  # image backbone lr = lr * scale (H-T scale_lr)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    gan_lr: float = 1e-4  # discriminators and generator (ACME: Adam(1e-4, (0.5, 0.999)))
    gan_betas: tuple[float, float] = (0.5, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    step_epochs: int = 30  # step schedule: x gamma every step_epochs
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine floor
    grad_clip: float = 0.0  # 0 = off
    freeze_backbone_epochs: int = 0  # image backbone frozen for the first N epochs (AdaMine/H-T stage 1)
    optimizer: Literal["adam", "adamw"] = "adam"  # main encoders (H-T: Adam, wd 0)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.gan_lr > 0, "optim.gan_lr", "must be > 0")
        _check(self.backbone_lr_scale >= 0, "optim.backbone_lr_scale", "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "must be two numbers in [0, 1)")
        _check(len(self.gan_betas) == 2 and all(0 <= b < 1 for b in self.gan_betas), "optim.gan_betas",
               "must be two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.step_epochs >= 1, "optim.step_epochs", "must be >= 1")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        _check(self.freeze_backbone_epochs >= 0, "optim.freeze_backbone_epochs", "must be >= 0")


@dataclass(frozen=True)
class ScalingConfig:
    """Data-parallel layout. Global batch = batch_size x num_workers x cache_steps."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractional on small CPU boxes so Ray Data keeps a CPU (see README)
    gpus_per_worker: float = 1.0
    cache_steps: int = 1  # feature-cache (GradCache) micro-batches per worker per step
    ray_num_cpus: int = 0  # logical CPUs for a local ray.init (0 = Ray's default)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, "scaling.gpus_per_worker", "must be > 0")
        _check(self.cache_steps >= 1, "scaling.cache_steps", "must be >= 1")
        _check(self.ray_num_cpus >= 0, "scaling.ray_num_cpus", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    run_name: str = "tnlbt"
    runs_dir: str = "runs"
    epochs: int = 100
    batch_size: int = 128  # per worker, per micro-batch (paired)
    recipe_only_every: int = 1  # H-T: one recipe-only batch per paired batch (0 = no recipe-only batches)
    recipe_only_batch_mult: int = 2  # recipe-only batches are this many times the paired batch (H-T: 2)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU unless measured faster
    seed: int = 1234
    log_every: int = 10
    ckpt_every_steps: int = 0  # 0 = only at epoch end
    max_steps_per_epoch: int = 0  # 0 = the whole split
    val_bag_size: int = 1000
    val_bags: int = 10
    fail_at_step: int = -1  # fault injection for tests: rank 0 raises once at this global step
    max_failures: int = 2
    shuffle_buffer: int = 512  # rows in each worker's local shuffle buffer (with per-epoch block-order shuffle)
    image_pick: Literal["random", "first"] = "random"  # which of a recipe's photos a paired row uses
    val_max_rows: int = 0  # cap on val rows embedded per epoch (0 = the whole split)

    def __post_init__(self) -> None:
        _check(bool(self.run_name) and "/" not in self.run_name, "train.run_name",
               "must be a non-empty name without '/'")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size", "must be >= 2 (in-batch negatives)")
        _check(self.recipe_only_every >= 0, "train.recipe_only_every", "must be >= 0")
        _check(self.recipe_only_batch_mult >= 1, "train.recipe_only_batch_mult", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")
        _check(self.val_bag_size >= 2, "train.val_bag_size", "must be >= 2")
        _check(self.val_bags >= 1, "train.val_bags", "must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.shuffle_buffer >= 0, "train.shuffle_buffer", "must be >= 0 (0 = off)")
        _check(self.val_max_rows >= 0, "train.val_max_rows", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    bag_sizes: tuple[int, ...] = (1000, 10000)
    n_bags: int = 10
    mode: Literal["random", "fixed"] = "random"  # H-T random bags | AdaMine/T-Food disjoint consecutive bags
    seed: int = 1234
    chunk_size: int = 1024
    # Ranks with exact ties: "optimistic" 1 + #strictly closer (ties for the query, the papers' medR) |
    # "pessimistic" #closer or equal (ties against the query, H-T's R@K in its worst case); tnlbt.metrics.
    ties: Literal["optimistic", "pessimistic"] = "optimistic"

    def __post_init__(self) -> None:
        _check(len(self.bag_sizes) >= 1 and all(b >= 2 for b in self.bag_sizes), "eval.bag_sizes",
               "must be a non-empty list of sizes >= 2")
        _check(self.n_bags >= 1, "eval.n_bags", "must be >= 1")
        _check(self.chunk_size >= 1, "eval.chunk_size", "must be >= 1")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Config:
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Config:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        return cls.from_dict(apply_overrides(raw, overrides or []))

    @classmethod
    def load(cls, preset_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Load a preset name (``demo_cpu``), a YAML path, or the defaults, then apply overrides."""
        if preset_or_path is None:
            return cls.from_dict(apply_overrides({}, overrides or []))
        return cls.from_yaml(resolve_preset(preset_or_path), overrides)

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    def with_overrides(self, overrides: list[str]) -> Config:
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))


# -- presets ------------------------------------------------------------------------------------------
def configs_dir() -> Path:
    """``configs/`` at the repository root (presets are not package data: they are meant to be edited)."""
    return Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def resolve_preset(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = configs_dir() / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {', '.join(list_presets())}")


# -- overrides ----------------------------------------------------------------------------------------
def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``3``, ``0.1``, ``true``, ``[1, 2]``)."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key, e.g. train.epochs")
        section, name = parts
        if not isinstance(out.get(section, {}), dict):
            raise ConfigError(f"{section}: must be a mapping")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


# -- generic builder with validation ------------------------------------------------------------------
def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(tp, data[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            if a is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept any number Python can parse.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x
