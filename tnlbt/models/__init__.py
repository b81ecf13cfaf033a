"""TNLBT model: H-T recipe encoder, timm image encoder, Cross Decoder and ACME parts (docs/contracts.md §4).

Importing this package does no work; torch and timm load here, timm's models only when one is created.
"""

from tnlbt.models.io import load_model, save_model
from tnlbt.models.tnlbt import TNLBT, create_model

__all__ = ["TNLBT", "create_model", "load_model", "save_model"]
