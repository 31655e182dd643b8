"""Strategic Task Weighting (SPEC §3): `weighter` holds the rules and the loss window (torch),
`config` the `stw.*` section (no torch). Names are imported on first use (`vipoly.lazy`), so that
loading a config does not import torch."""
from vipoly.lazy import lazy_names

_WHERE = {"RULES": "weighter", "TaskWeighter": "weighter"}
__all__ = list(_WHERE)
__getattr__ = lazy_names(__name__, _WHERE)
