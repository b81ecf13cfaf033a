"""Image encoder: any timm model by name, projected to the joint space, with its own preprocessing.

The backbone is built with ``num_classes=0``; pooled features come from ``forward_head(feats,
pre_logits=True)`` and token features from ``forward_features`` (never a Linear on ``forward_features``: H-T
broke on timm >= 0.6 when that started returning all tokens). Preprocessing (mean/std, interpolation, crop
fraction) comes from the model's pretrained config, so a ViT gets 0.5/0.5 and a ResNet ImageNet statistics.

Weights: ``""`` random init; a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict, loaded strictly (every
backbone key must match; the classifier is dropped); ``"hub"`` downloads through timm only when online.
Nothing is ever downloaded implicitly, and an offline hub request fails at once with instructions.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_TRUTHY = {"1", "true", "yes", "on"}


class PretrainedWeightsError(RuntimeError):
    """Backbone weights could not be provided; the message says how to fix it."""


def _hub_help(name: str) -> str:
    return (f"To use pretrained weights for {name!r} offline, put a state dict file on this machine and set "
            f"model.image_pretrained=/path/to/weights.safetensors (or .pth/.bin), e.g. saved elsewhere with "
            f"`safetensors.torch.save_file(timm.create_model({name!r}, pretrained=True).state_dict(), "
            f"'weights.safetensors')`; or set model.image_pretrained='' for random init.")


def _check_hub_reachable(name: str, timeout_s: float = 2.0) -> None:
    """Fail fast (no 25-50 s retry loop inside huggingface_hub) when the hub cannot be used."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            raise PretrainedWeightsError(
                f"model.image_pretrained='hub' but {var}={os.environ[var]} (offline mode). "
                + _hub_help(name))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout_s):
            pass
    except OSError as e:
        raise PretrainedWeightsError(
            f"model.image_pretrained='hub' but {host} is unreachable ({e}). " + _hub_help(name)) from e


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"model.image_pretrained: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint file is data, never code.
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(f"model.image_pretrained: cannot read {path}: {e}") from e
    for key in ("state_dict", "model", "model_state_dict", "module"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise PretrainedWeightsError(f"model.image_pretrained: {path} does not hold a state dict of tensors")
    # A TNLBT checkpoint's image backbone, or a DDP-wrapped model.
    for prefix in ("image_encoder.backbone.", "module."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into a timm backbone built with ``num_classes=0``, strictly.

    The model family's own ``checkpoint_filter_fn`` runs first (resamples ViT position embeddings to another
    ``img_size``, converts original-format checkpoints); classifier weights are dropped because the backbone
    has none. Any other missing or unexpected key, or a shape mismatch, raises
    :class:`PretrainedWeightsError`.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        try:
            try:
                sd = filter_fn(sd, model)
            except TypeError:
                sd = filter_fn(sd)
        except Exception as e:
            # Filters assume their family's key layout and crash (KeyError) on anything else; the key
            # comparison below then names what does not match, which is the more useful message.
            log.debug("checkpoint_filter_fn of %s failed on %s: %r", type(model).__name__, path, e)
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    own = model.state_dict()
    for c in classifiers:
        for k in [k for k in sd if k.startswith(c + ".") and k not in own]:
            del sd[k]
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches
        raise PretrainedWeightsError(f"model.image_pretrained: {path} does not fit {type(model).__name__} "
                                     f"(wrong model.image_model or model.image_size?): {e}") from e
    # Older checkpoints (e.g. torchvision-era ResNets) carry no BatchNorm step counters; those are harmless.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")

        raise PretrainedWeightsError(
            f"model.image_pretrained: {path} does not match the backbone {type(model).__name__}: "
            f"{len(missing)} missing key(s) [{show(missing)}], {len(unexpected)} unexpected key(s) "
            f"[{show(unexpected)}]. Is model.image_model the architecture these weights were saved from?")
    log.info("loaded image backbone weights from %s (%d tensors)", path, len(sd))


def create_backbone(name: str, image_size: int, pretrained: str = "") -> nn.Module:
    """``timm.create_model(name, num_classes=0[, img_size])``, weights as ``model.image_pretrained`` says."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"model.image_model: unknown timm model {name!r} "
                         f"(see timm.list_models(); e.g. vit_base_patch16_224, resnet50)")
    use_hub = pretrained == "hub"
    if use_hub:
        _check_hub_reachable(name)
    try:
        model = timm.create_model(name, pretrained=use_hub, num_classes=0, img_size=image_size)
    except TypeError:  # CNNs take no img_size: they are size-agnostic anyway
        model = timm.create_model(name, pretrained=use_hub, num_classes=0)
    if pretrained and not use_hub:
        load_backbone_weights(model, pretrained)
    return model


class _ToRGB:
    """PIL image in any mode (L, RGBA, P, CMYK) -> RGB. A class, not a lambda, so transforms pickle."""

    def __call__(self, img: Any) -> Any:
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")


def build_image_transform(data_cfg: dict[str, Any], image_size: int, train: bool) -> Callable[[Any], Tensor]:
    """PIL.Image -> (3, S, S) float tensor, normalised with the backbone's mean/std.

    As H-T, scaled: resize the shorter side to S / crop_pct (256 for S=224 at 0.875), then a random crop with
    a horizontal flip for training, a centre crop for evaluation.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    interp = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}.get(
        str(data_cfg.get("interpolation", "bilinear")), InterpolationMode.BILINEAR)
    crop_pct = float(data_cfg.get("crop_pct") or 0.875)
    resize = max(image_size, math.floor(image_size / crop_pct))
    steps: list[Any] = [_ToRGB(), T.Resize(resize, interpolation=interp)]
    if train:
        steps += [T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps += [T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean=list(data_cfg["mean"]), std=list(data_cfg["std"]))]
    return T.Compose(steps)


class ImageEncoder(nn.Module):
    """timm backbone -> pooled features -> Linear -> tanh (B, D); tokens (B, L, W_img) for the Cross
    Decoder."""

    def __init__(self, name: str, image_size: int, embed_dim: int, pretrained: str = "") -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.backbone = create_backbone(name, image_size, pretrained)
        # Some families (MobileNetV3, EfficientNet-style heads) widen after pooling: head_hidden_size is then
        # the width of forward_head(pre_logits=True), num_features that of forward_features.
        self.token_width = int(self.backbone.num_features)
        self.pooled_width = int(getattr(self.backbone, "head_hidden_size", None) or self.token_width)
        self.proj = nn.Linear(self.pooled_width, embed_dim)
        self.frozen = False
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.data_config = {k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if k in cfg}
        self.data_config["input_size"] = (3, image_size, image_size)

    def _tokens(self, feats: Tensor) -> Tensor:
        if feats.ndim == 3:
            return feats
        if feats.ndim == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)
        raise ValueError(f"{self.name}: unsupported forward_features output shape {tuple(feats.shape)}")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone.forward_features(images)
                pooled = self.backbone.forward_head(feats, pre_logits=True)
        else:
            feats = self.backbone.forward_features(images)
            pooled = self.backbone.forward_head(feats, pre_logits=True)
        return {"emb": torch.tanh(self.proj(pooled)), "tokens": self._tokens(feats)}

    def freeze(self, flag: bool) -> None:
        self.frozen = bool(flag)
        for p in self.backbone.parameters():
            p.requires_grad_(not flag)
