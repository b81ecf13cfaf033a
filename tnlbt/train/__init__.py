"""Large-batch TNLBT training: plain-PyTorch step and loop, feature cache, checkpoints, Ray Train launcher.

Modules (nothing is imported here, so ``import tnlbt.train`` is free of torch and Ray):

* :mod:`tnlbt.train.step` — one training step (all TNLBT terms), :func:`~tnlbt.train.step.build_optimizers`
* :mod:`tnlbt.train.feature_cache` — GradCache: exact large-batch gradients with micro-batch memory
* :mod:`tnlbt.train.loop` — the per-worker loop (no Ray): :func:`~tnlbt.train.loop.run_training`
* :mod:`tnlbt.train.backend` — what the loop needs from its environment; :class:`~tnlbt.train.backend.LocalBackend`
* :mod:`tnlbt.train.validation` — val-split embeddings and bagged retrieval metrics at every epoch end
* :mod:`tnlbt.train.run_files` — the run directory: ``metrics.jsonl``, TensorBoard, publishing to remote storage
* :mod:`tnlbt.train.precision` — the autocast dtype (``train.precision``) and the context that applies it
* :mod:`tnlbt.train.checkpoint` — checkpoint directories, ``train_state.pt``, atomic writes
* :mod:`tnlbt.train.lr` — warm-up + cosine/step schedules as pure functions of the step
* :mod:`tnlbt.train.ray_trainer` — ``tnlbt train``: TorchTrainer, Ray Data shards, fault tolerance [ray]
* :mod:`tnlbt.train.plots` — ``tnlbt plot RUN``
"""
