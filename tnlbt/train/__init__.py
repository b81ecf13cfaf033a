"""Large-batch TNLBT training: plain-PyTorch step and loop, feature cache, checkpoints, Ray Train launcher.

Modules (nothing is imported here, so ``import tnlbt.train`` is free of torch and Ray):

* :mod:`tnlbt.train.step` — one training step (all TNLBT terms), :func:`~tnlbt.train.step.build_optimizers`
* :mod:`tnlbt.train.feature_cache` — GradCache: exact large-batch gradients with micro-batch memory
* :mod:`tnlbt.train.loop` — the per-worker loop (no Ray), :class:`~tnlbt.train.loop.LocalBackend`
* :mod:`tnlbt.train.checkpoint` — checkpoint directories, ``train_state.pt``, atomic writes
* :mod:`tnlbt.train.lr` — warm-up + cosine/step schedules as pure functions of the step
* :mod:`tnlbt.train.ray_trainer` — ``tnlbt train``: TorchTrainer, Ray Data shards, fault tolerance [ray]
* :mod:`tnlbt.train.plots` — ``tnlbt plot RUN``
"""
