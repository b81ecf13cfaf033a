"""tnlbt: TNLBT cross-modal recipe retrieval (recipe text <-> food photo), trained and served on Ray.

Plain PyTorch inside (models, losses, metrics, training step); Ray only at the edges (preprocess, the train
launcher, embedding, serving). Importing this package does no work.
"""

__version__ = "0.1.0"
