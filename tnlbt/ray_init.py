"""One way to get a Ray session for every command: join ``RAY_ADDRESS``'s cluster, or start a local one.

Why a helper: ``ray.init(num_cpus=...)`` is refused when connecting to an existing cluster ("When connecting to
an existing cluster, num_cpus and num_gpus must not be provided"), so a command that sizes a local Ray must not
pass its size to a cluster. On a cluster the caller's parallelism still applies, as the size of its task or
actor pools, which is what makes an autoscaler add nodes.
"""

from __future__ import annotations

import logging
import os

# Ray Train V2's PlacementGroupCleaner asks the State API (served by the dashboard) every second whether the train
# controller is alive. The local Ray below runs without the dashboard, so every ask fails and logs a warning:
# 1,213 lines in one 21-minute demo, burying the training log. Its safety net (removing a dead controller's
# placement group) needs that API, so here it could never act anyway; the local Ray's workers lower its logger.
_NOISY_WITHOUT_DASHBOARD = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """``worker_process_setup_hook`` of a local Ray: silence warnings that only say the dashboard is off."""
    for name in _NOISY_WITHOUT_DASHBOARD:
        logging.getLogger(name).setLevel(logging.ERROR)


def ensure_ray(num_cpus: int | None = None, *, log_to_driver: bool = False) -> bool:
    """Connect to ``$RAY_ADDRESS`` if set, else start a local Ray with ``num_cpus`` logical CPUs (``None`` or 0:
    Ray's default). Returns True when this call initialised Ray (the caller then shuts it down), False when this
    process was already connected."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: no token files in ~/.ray
    ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"worker_process_setup_hook": "tnlbt.ray_init.quiet_worker_logs"})
    return True
