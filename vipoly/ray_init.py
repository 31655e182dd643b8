"""Joining Ray, the one way every entrypoint does it.

An address (`run.ray_address`, `--ray-address`), RAY_ADDRESS or `ray job submit` joins that
cluster, which sizes itself. Otherwise an embedded local instance starts (`address="local"`: never
a stray cluster left running on the machine).
"""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
             log_to_driver: bool = True, verbose: bool = False) -> bool:
    """Start or join Ray unless this process already has; True when it started a local instance.

    dashboard: start the local instance's dashboard (on 127.0.0.1). Ray Train's placement-group
    cleaner asks its state API whether the run's controller is alive; without a dashboard the
    cleaner is left out (vipoly.train.launch._without_idle_helpers).
    verbose (run.verbose): keep Ray Data's INFO lines (each dataset's execution plan) on the console.
    """
    import ray  # ray

    quiet_ray_data(verbose)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)  # ray
        return False
    # Ray Train's preemption watcher listens for a cloud node's drain notice, which one machine never
    # gets; its actor also logs an error line from Ray's core at every fit. Processes of the local
    # instance inherit this environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,  # ray
             log_to_driver=log_to_driver)
    return True


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's console lines at WARNING unless `verbose`; its log file in the session folder
    keeps everything. (Its logger has a console handler of its own and does not propagate, so the
    root logger's level does not reach it.)"""
    import ray.data  # noqa: F401  (configures the `ray.data` logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        # The console one writes to a stream; the session log's handler is a plain Handler.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
