"""The Dagster code location (`dagster dev -m prism_assets.definitions`): the wiring of `location.build`, from the
settings of this process's environment (`platform.Configuration.from_environ`, the one reader of it)."""

import os

from prism_assets.location import CHECKS, build
from prism_assets.platform import Configuration

LOCATION = build(Configuration.from_environ(os.environ))
EXPERIMENTS, ASSETS, RESOURCES = LOCATION.experiments, LOCATION.assets, LOCATION.resources
defs = LOCATION.definitions

__all__ = ["ASSETS", "CHECKS", "EXPERIMENTS", "LOCATION", "RESOURCES", "defs"]
