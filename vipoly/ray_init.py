"""Joining Ray, the one way every entrypoint does it.

An address (`run.ray_address`, `--ray-address`), RAY_ADDRESS or `ray job submit` joins that
cluster, which sizes itself. Otherwise an embedded local instance starts (`address="local"`: never
a stray cluster left running on the machine).
"""
from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
             log_to_driver: bool = True) -> bool:
    """Start or join Ray unless this process already has; True when it started a local instance.

    dashboard: start the local instance's dashboard (on 127.0.0.1). Ray Train needs it: its
    placement-group cleaner asks the dashboard's state API whether the run's controller is alive,
    and without one it warns about it every second of the run.
    """
    import ray  # ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)  # ray
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,  # ray
             log_to_driver=log_to_driver)
    return True
