"""Typed configuration: frozen dataclasses, YAML presets, ``key=value`` overrides, validation.

A config is a tree of frozen dataclasses: :class:`Config` for training (saved with every checkpoint),
:class:`IndexConfig` for ``tnlbt index`` and :class:`ServeConfig` for ``tnlbt serve`` and the Serve builders;
the last two share :class:`StoreConfig` (where the vectors live) and :class:`IndexSettings` (how they are
indexed). All are built by one typed loader with the same ``key=value`` overrides and one-line errors.
A config crosses process boundaries (Ray workers, checkpoints, Serve replicas) as a plain dict / JSON and is
rebuilt at once (:meth:`Config.from_dict`); it is never pickled.

Validation happens in two layers:
* the loader checks every key against the dataclass fields (an unknown key names the allowed ones) and
  every value against its annotation (``Literal`` choices are listed in the message);
* each section's ``__post_init__`` checks ranges and cross-field rules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
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
    # Hostile or broken input (counted in stats.json, see tnlbt/data/preprocess.py)
    max_json_depth: int = 64  # nesting levels of one JSON record (Recipe1M's: 3); deeper: rejected, too_deep
    # Stored raw text is cut to these (kept, counted as records.truncated); the search API accepts the same sizes
    # (serve/schemas.py MAX_TITLE, MAX_LINE, MAX_LINES).
    max_title_chars: int = 300
    max_line_chars: int = 500  # each ingredient / instruction line
    max_lines: int = 50  # ingredient lines, and instruction lines, per recipe
    allow_partial: bool = False  # keep the items before a JSON error (a truncated file) instead of failing

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
        _check(self.max_json_depth >= 3, "data.max_json_depth", "must be >= 3 (a Recipe1M record nests 3 levels)")
        for name in ("max_title_chars", "max_line_chars", "max_lines"):
            _check(getattr(self, name) >= 1, f"data.{name}", "must be >= 1")

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
    fused: bool = True  # Adam/AdamW as one fused kernel per optimiser (CPU and CUDA); false: PyTorch's default

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
    # Where a Ray Train worker's rows come from: Ray Data streaming shards, or the train split read into each
    # worker's memory and dealt by a seeded permutation (tnlbt.train.backend.SeededRows: no per-epoch executor
    # start-up, no read tasks on the training cores, a reproducible order). auto: in memory when the train and
    # val Parquet parts together are at most in_memory_max_mb (each worker holds one copy).
    data_path: Literal["auto", "ray_data", "in_memory"] = "auto"
    in_memory_max_mb: int = 1024
    image_pick: Literal["random", "first"] = "random"  # which of a recipe's photos a paired row uses
    val_max_rows: int = 0  # cap on val rows embedded per epoch (0 = the whole split)
    # Partial-recipe augmentation (tnlbt.data.collate.PartialRecipes): this share of paired rows is cut to a title,
    # ingredients, title + ingredients or instructions (uniformly), keeping each line of a kept list with
    # probability partial_line_keep; those rows are left out of the recipe self-supervision. 0 = off.
    partial_recipes: float = 0.0
    partial_line_keep: float = 0.5
    # Step speed, not maths (tnlbt.train.step.prepare_model): conv weights and images channels-last (NHWC, the
    # layout oneDNN and tensor cores run fastest), dropout masks from a cheaper generator on CPU
    # (tnlbt/models/dropout.py: same distribution, another random stream), the recipe encoder's lines packed
    # (tnlbt/models/recipe_encoder.py). false: the plain paths.
    channels_last: bool = True
    fast_dropout: bool = True
    pack_lines: bool = True  # recipe encoder: several short lines per row in training (same maths per line)
    batched_ssl: bool = True  # recipe SSL: the 6 component pairs in one batched loss (losses.recipe_ssl_loss_batched)

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
        _check(self.in_memory_max_mb >= 0, "train.in_memory_max_mb", "must be >= 0")
        _check(0.0 <= self.partial_recipes <= 1.0, "train.partial_recipes", "must be in [0, 1]")
        _check(0.0 < self.partial_line_keep <= 1.0, "train.partial_line_keep", "must be in (0, 1]")


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


QUANTIZATIONS = ("none", "int8")
_ENV_PREFIX = "TNLBT_INDEX_"


@dataclass(frozen=True)
class IndexSettings:
    """How a collection is indexed (build time) and searched (search time), for both stores.

    Build time -- fixed when ``tnlbt index`` builds a collection (stored with it):

    * ``hnsw_m`` edges per node, ``ef_construct`` beam width while building the graph;
    * ``full_scan_points``: Qdrant's full-scan threshold, in points (converted to KB of vectors for Qdrant).
      A filtered query expected to match fewer points is answered by scanning them; the edge store also
      builds no graph at all for a collection smaller than this. ``None``: 20,000 points for the edge store
      (as before), the server's own default (10,000 KB) for a Qdrant server;
    * ``quantization``: ``"int8"`` (Qdrant scalar quantisation with ``quantile``, the int8 copy pinned in RAM)
      or ``"none"``;
    * ``on_disk_vectors``: keep the original float32 vectors on disk (memory-mapped, not preloaded); with
      ``int8`` only the 4x smaller quantised copy has to stay in RAM.

    The defaults (int8, originals on disk, rescore with oversampling 2, ``hnsw_ef`` 256) replaced float32 in
    RAM with ``hnsw_ef`` 128 after ``bench/index.py tradeoff`` (100k x 1024-d clustered vectors, qdrant-edge):
    rescored int8 has the recall@10 of float32 scores on the same graph, at about half the latency and 2.6x
    less resident memory, for ~18% more disk; ef 256 instead of 128 buys ~1-2 points of recall@10 (0.96-0.98
    -> 0.99, varying from build to build) for ~0.1 ms. ``quantization=none on_disk_vectors=false hnsw_ef=128``
    is the earlier behaviour.

    Search time -- read by whoever queries (``tnlbt serve``, ``tnlbt search``), may differ from the build:

    * ``hnsw_ef`` beam width (at least ``k``); ``exact`` scans every vector (no graph, no quantisation);
    * ``rescore``: re-rank the quantised candidates with the original vectors (then the scores are exact
      cosines); ``oversampling``: fetch ``oversampling * k`` quantised candidates before rescoring.
      Both only matter for a collection built with ``quantization="int8"``.

    qdrant-client's local mode (``:memory:`` / a folder) ignores all of this: it is exact brute force in
    Python; it drops the HNSW and quantisation configs and warns about ``search_params``, so the local store
    does not send them.

    Every field can be set from the environment as ``TNLBT_INDEX_<FIELD>`` (e.g. ``TNLBT_INDEX_QUANTIZATION=int8
    TNLBT_INDEX_HNSW_EF=64``); :func:`open_store` reads it when no settings are given.
    """

    hnsw_m: int = 16
    ef_construct: int = 100
    full_scan_points: int | None = None
    quantization: str = "int8"
    quantile: float = 0.99
    on_disk_vectors: bool = True
    hnsw_ef: int = 256
    exact: bool = False
    rescore: bool = True
    oversampling: float = 2.0

    BUILD_FIELDS = ("hnsw_m", "ef_construct", "full_scan_points", "quantization", "quantile", "on_disk_vectors")

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, what: str) -> None:
            _check(ok, f"index setting {key}", f"{getattr(self, key)!r} {what}")

        check(self.hnsw_m >= 2, "hnsw_m", "must be >= 2")
        check(self.ef_construct >= 4, "ef_construct", "must be >= 4")
        check(self.full_scan_points is None or self.full_scan_points >= 1, "full_scan_points", "must be >= 1")
        check(self.quantization in QUANTIZATIONS, "quantization", f"choose one of {', '.join(QUANTIZATIONS)}")
        check(0.5 <= self.quantile <= 1.0, "quantile", "must be in [0.5, 1]")
        check(self.hnsw_ef >= 1, "hnsw_ef", "must be >= 1")
        check(self.oversampling >= 1.0, "oversampling", "must be >= 1.0")

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, items: Iterable[str] | Mapping[str, Any] = (), base: IndexSettings | None = None) -> IndexSettings:
        """``["hnsw_ef=64", "quantization=int8"]`` (or a mapping of strings / values) on top of ``base``.

        Strings (from the command line or the environment) are read as YAML scalars, then checked by the same
        typed builder as every config section (:func:`_coerce`); an unknown key is a one-line error.
        """
        pairs = items.items() if isinstance(items, Mapping) else (_split_kv(i) for i in items)
        known = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, raw in pairs:
            key = key.strip().lower()
            if key not in known:
                raise ConfigError(f"unknown index setting {key!r}; allowed: {', '.join(sorted(known))}")
            value = _scalar(raw) if isinstance(raw, str) else raw
            changes[key] = value.lower() if isinstance(value, str) else value
        merged = {**dataclasses.asdict(base or cls()), **changes}
        return _build(cls, merged, "index setting", sep=" ")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, base: IndexSettings | None = None) -> IndexSettings:
        """Defaults overridden by ``TNLBT_INDEX_<FIELD>`` variables (unknown ones are an error)."""
        env = os.environ if environ is None else environ
        found = {k[len(_ENV_PREFIX) :]: v for k, v in env.items() if k.startswith(_ENV_PREFIX)}
        return cls.parse(found, base)

    @classmethod
    def layered(cls, recorded: dict[str, Any] | None = None, items: Iterable[str] = ()) -> IndexSettings:
        """What a command uses: the defaults, then the settings ``recorded`` in ``index.json`` when the index
        was built (so a reader searches the way the index was built for), then ``TNLBT_INDEX_*``, then the
        command line's ``key=value`` items (``--index-setting``), each over the one before."""
        known = {f.name for f in dataclasses.fields(cls)}
        base = cls.parse({k: v for k, v in (recorded or {}).items() if k in known})
        return cls.parse(items, base=cls.from_env(base=base))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.BUILD_FIELDS}

    def full_scan_kb(self, dim: int, default_points: int | None) -> int | None:
        """The threshold in KB of float32 vectors, as Qdrant wants it (``None`` = leave the engine default)."""
        pts = self.full_scan_points if self.full_scan_points is not None else default_points
        return None if pts is None else max(1, pts * dim * 4 // 1024)


def _split_kv(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"index setting {item!r} must look like key=value (e.g. hnsw_ef=64)")
    k, v = item.split("=", 1)
    return k, v


MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # one photo upload (API and UI)


@dataclass(frozen=True)
class StoreConfig:
    """Where the vectors live: the values that always travel together (a Qdrant server by ``url``, or an
    embedded store in ``path``; ``kind`` auto = a server for a URL, else qdrant-edge when installed).

    ``settings`` are ``key=value`` changes to the :class:`IndexSettings`, layered over the defaults, what the
    index recorded when it was built and ``TNLBT_INDEX_*`` (:meth:`IndexSettings.layered`).
    """

    kind: Literal["auto", "qdrant", "edge"] = "auto"
    url: str | None = None  # Qdrant server (API key from QDRANT_API_KEY)
    path: str | None = None  # embedded store folder (default RUN/edge or RUN/qdrant)
    settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(not (self.url and self.kind == "edge"), "store.kind",
               "the edge store is embedded: give a path, not a URL")
        _check(not (self.path and not self.url and "://" in self.path), "store.path",
               f"{self.path}: the embedded store is a local folder (file locks, mmaps); give a local path, or use "
               "a Qdrant server (store.url / --qdrant-url)")
        for item in self.settings:
            IndexSettings.parse([item])  # a bad setting fails here, in one line, not in a replica

    def resolved_settings(self, recorded: Mapping[str, Any] | None = None) -> IndexSettings:
        """The settings a command uses (see :meth:`IndexSettings.layered`)."""
        return IndexSettings.layered(dict(recorded or {}), self.settings)


@dataclass(frozen=True)
class IndexConfig:
    """``tnlbt index``: which split, how it is embedded (a Ray Data actor pool) and where it goes."""

    split: Literal["train", "val", "test", "all"] = "test"
    keep: int = 2  # index versions kept
    actors: int = 0  # embedding actors (0 = sized to the cluster)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 32
    store: StoreConfig = field(default_factory=StoreConfig)
    # A user catalog (`tnlbt index --catalog`, tnlbt/data/catalog.py): one JSONL line may hold at most this
    # many bytes, one photo file at most max_photo_bytes (the pixel limits of the query path apply as well).
    catalog_max_row_bytes: int = 1 << 20
    max_photo_bytes: int = 32 << 20
    # The publish gate (tnlbt/index/gate.py): the new version's recipe -> photo recall@gate_k on the canary
    # may fall at most gate_margin (absolute) below the live version's, and must reach gate_min_recall;
    # gate_canary: how many of the indexed recipe/photo pairs make the default canary.
    gate_margin: float = 0.05
    gate_k: int = 10
    gate_canary: int = 200
    gate_min_recall: float = 0.0

    def __post_init__(self) -> None:
        _check(self.keep >= 1, "index.keep", "must be >= 1")
        _check(self.catalog_max_row_bytes >= 1024, "index.catalog_max_row_bytes", "must be >= 1024")
        _check(self.max_photo_bytes >= 1024, "index.max_photo_bytes", "must be >= 1024")
        _check(0.0 <= self.gate_margin <= 1.0, "index.gate_margin", "must be in 0..1 (absolute recall)")
        _check(0.0 <= self.gate_min_recall <= 1.0, "index.gate_min_recall", "must be in 0..1")
        _check(self.gate_k >= 1 and self.gate_canary >= 1, "index.gate_k", "gate_k and gate_canary must be >= 1")
        _check(self.actors >= 0, "index.actors", "must be >= 0 (0 = sized to the cluster)")
        _check(self.batch_size >= 1, "index.batch_size", "must be >= 1")


# The Serve ``args`` name the store's values flat (``serve/config.yaml``, the RayService, ``serve run ...
# qdrant_url=...``): :meth:`ServeConfig.from_args` reads these keys into its :class:`StoreConfig`.
_SERVE_ARGS_STORE = {"store": "kind", "qdrant_url": "url", "qdrant_path": "path", "index_settings": "settings"}


# Text queries rank hybrid (tnlbt.index.hybrid: dense + a lexical score over title and ingredient terms) unless a
# request or the serve config says otherwise: set to what bench/hybrid.py measured better (README "Hybrid ranking").
HYBRID_DEFAULT = True


# graph: encoders and index are deployments of their own (each scales out on a cluster); colocated: both
# encoders and the embedded index inside the API replica (no actor hops; serve/local.py); auto: colocated
# with an embedded store (its index is one replica on one node anyway), graph with a Qdrant server.
ServeTopology = Literal["auto", "colocated", "graph"]
SERVE_TOPOLOGIES: tuple[str, ...] = typing.get_args(ServeTopology)
# Serve's HTTP proxy (tnlbt.serve.app.serve_env): its Python proxy, or the bundled HAProxy (direct ingress)
SERVE_PROXIES: tuple[str, ...] = ("python", "haproxy")


@dataclass(frozen=True)
class ServeConfig:
    """``tnlbt serve`` and the Serve builders (``serve/config.yaml``'s ``args``): one typed section."""

    run: str = ""  # an indexed run directory (local or a URI)
    store: StoreConfig = field(default_factory=StoreConfig)
    cpus: float = 0.0  # CPUs per encoder replica (0 = sized so the whole app fits the cluster)
    gpus: float = 0.0  # GPU share per encoder replica; 0.5 = a text and an image encoder replica on one GPU
    num_threads: int = 0  # torch threads per encoder replica (0 = torch's default)
    max_replicas: int = 2  # autoscaling ceiling of the encoders and the API
    index_replicas: int = 2  # SearchIndex replicas with a Qdrant server (an embedded store has exactly one)
    text_batch: int = 16
    image_batch: int = 8
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    # Photo decodes at once per image encoder replica, and how long a request waits for one before its 503:
    # worst-case decode memory per replica is decode_slots x ~0.25 GB (tnlbt.inference.MAX_DECODED_PIXELS).
    decode_slots: int = 2
    decode_wait_s: float = 2.0
    request_timeout_s: float = 20.0
    api_app: str = "api"  # the API application's name (the UI looks it up)
    # write keys, one a line, besides TNLBT_API_KEY (tnlbt.serve.auth); no key anywhere = writes are off
    api_keys_file: str = ""
    examples: int = 4  # test-split examples shown in the UI
    hybrid: bool = HYBRID_DEFAULT  # text searches that do not say: hybrid or dense ranking
    topology: ServeTopology = "auto"  # SERVE_TOPOLOGIES above

    def __post_init__(self) -> None:
        _check(self.cpus >= 0 and self.gpus >= 0, "serve.cpus", "cpus and gpus must be >= 0")
        for name in ("max_replicas", "index_replicas", "text_batch", "image_batch", "max_upload_bytes", "decode_slots"):
            _check(getattr(self, name) >= 1, f"serve.{name}", "must be >= 1")
        _check(self.request_timeout_s > 0, "serve.request_timeout_s", "must be > 0")
        _check(self.decode_wait_s >= 0, "serve.decode_wait_s", "must be >= 0")
        _check(self.num_threads >= 0 and self.examples >= 0, "serve.num_threads", "num_threads, examples >= 0")

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None, overrides: list[str] | None = None) -> ServeConfig:
        """A Serve application's ``args`` (plain data; a key with a null value takes the default)."""
        data = {k: v for k, v in (args or {}).items() if v is not None and v != ""}
        store = {_SERVE_ARGS_STORE[k]: data.pop(k) for k in list(data) if k in _SERVE_ARGS_STORE}
        if isinstance(store.get("settings"), Mapping):  # {hnsw_ef: 64} reads as ["hnsw_ef=64"]
            store["settings"] = [f"{k}={v}" for k, v in store["settings"].items()]
        if store:
            data["store"] = store
        return load_section(cls, data, overrides or [], "serve")

    @property
    def colocated(self) -> bool:
        """Whether ``topology`` (``auto`` resolved by the store) puts the encoders and index in the API replica."""
        return self.topology == "colocated" or (self.topology == "auto" and not self.store.url)

    def to_args(self) -> dict[str, Any]:
        """The flat ``args`` form that :meth:`from_args` reads (what crosses to the Serve builders)."""
        out = _to_plain(dataclasses.asdict(self))
        store = out.pop("store")
        out.update({k: store[v] for k, v in _SERVE_ARGS_STORE.items()})
        return out


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
    def from_yaml(cls, path: str | Path | Traversable, overrides: list[str] | None = None) -> Config:
        return cls.from_dict(apply_overrides(read_preset(path), overrides or []))

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
def configs_dir() -> Traversable:
    """The presets shipped with the package (``configs/`` in the source tree, installed as ``tnlbt.presets``).

    Read through :mod:`importlib.resources`, so a wheel or a non-editable install has them too.
    """
    return resources.files("tnlbt.presets")


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in configs_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_preset(name_or_path: str | Path) -> Path | Traversable:
    """A YAML path as given, else the shipped preset of that name."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = configs_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {', '.join(list_presets())}")


def read_preset(path: str | Path | Traversable, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's sections as plain data, with ``extends: NAME`` resolved: the named preset (a shipped name or
    a path) is read first and this file's keys are laid over it, section by section."""
    if isinstance(path, str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or base_name in _seen:
        raise ConfigError(f"{path}: extends must name another preset (no cycles); got {base_name!r}")
    base = read_preset(resolve_preset(base_name), (*_seen, base_name))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base


# -- overrides ----------------------------------------------------------------------------------------
def apply_overrides(raw: dict[str, Any], overrides: list[str], min_depth: int = 2) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (``a.b.c=value`` reaches nested sections); values are parsed as YAML
    (``3``, ``0.1``, ``true``, ``[1, 2]``). ``min_depth``: 2 for :class:`Config` (every key is in a section),
    1 for a single section such as :class:`ServeConfig` (``cpus=0.5``, ``store.url=...``)."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < min_depth or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key, e.g. train.epochs")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: must be a mapping")
            node = child
        node[parts[-1]] = _scalar(value)
    return out


def _scalar(text: str) -> Any:
    """A value as typed on a command line or in the environment, read as YAML (``64``, ``true``, ``[1, 2]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_section(cls: type, data: Mapping[str, Any], overrides: list[str], prefix: str) -> Any:
    """One config section (e.g. :class:`ServeConfig`) from plain data plus ``key=value`` overrides."""
    return _build(cls, apply_overrides(dict(data), overrides, min_depth=1), prefix)


# -- generic builder with validation ------------------------------------------------------------------
def _build(cls: type, data: Any, prefix: str, sep: str = ".") -> Any:
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
        key = f"{prefix}{sep}{name}" if prefix else name
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
                if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
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
