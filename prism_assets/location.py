"""The wiring: every asset, check, resource and instigator of the code location, built from one `Configuration`.

`build(configuration)` makes the whole code location from the settings (`prism_assets.platform`); `definitions.py`
builds it from this process's environment for Dagster, and the main job's workers from the configuration their parent
read, never from the environment.
"""

import sys
from dataclasses import dataclass
from typing import Any

import dagster as dg

from prism_assets import automation, experiments, keys
from prism_assets.assets import asset_graph, data, dpo
from prism_assets.platform import Configuration
from resources.io_managers import ParquetIOManager
from resources.launcher import LocalLauncher, RunLauncher
from resources.prism_source import PrismSource
from resources.slurm import SlurmLauncher
from resources.storage import DpoStorage

CHECKS = [data.chosen_scored_higher, data.both_responses_from_one_model, data.no_duplicated_interaction]


@dataclass(frozen=True)
class CodeLocation:
    """What `build` makes: the experiments and every definition, by kind, and the Definitions Dagster loads."""

    configuration: Configuration
    experiments: list[experiments.Experiment]
    assets: list[dg.AssetsDefinition]
    resources: dict
    definitions: dg.Definitions

    @property
    def unpartitioned(self) -> list[dg.AssetsDefinition]:
        """The data, statistics and reference assets: all but the DPO runs, the table and the write-up."""
        later = {*(keys.group_dpo_run(e.name) for e in self.experiments), keys.CORRESPONDENCE_TABLE}
        return [asset for asset in self.assets if asset.key not in {*later, keys.RESEARCH_REPORT}]

    @property
    def storage(self) -> DpoStorage:
        return self.resources["dpo_storage"]


def launcher(configuration: Configuration) -> RunLauncher:
    if configuration.platform.launcher == "slurm":
        return SlurmLauncher(**configuration.slurm)
    return LocalLauncher(threads_per_run=configuration.platform.threads_per_run, warm_modules=list(dpo.WARM_MODULES))


def build(configuration: Configuration) -> CodeLocation:
    """The code location of these settings. A setting the experiments file or a schema refuses, or a PRISM_STORAGE
    that cannot be a directory, raises ValueError, one line naming it."""
    platform = configuration.platform
    problem = platform.storage_problem()
    if problem:
        raise ValueError(problem)
    chosen = configuration.experiments()
    storage = platform.storage_dir
    resources: dict[str, Any] = {  # each key its own resource class
        "prism_source": PrismSource(
            source=platform.source,
            synthetic_users=platform.synthetic_users,
            synthetic_seed=platform.synthetic_seed,
            synthetic_effects=platform.synthetic_effects,
            synthetic_dir=str(storage / "synthetic_prism"),
        ),
        "io_manager": ParquetIOManager(base_dir=str(storage / "assets")),
        "dpo_storage": DpoStorage(
            models_dir=str(storage / "models"),
            runs_dir=str(storage / "runs"),
            reports_dir=str(storage / "reports"),
            python=platform.python or sys.executable,
        ),
        "launcher": launcher(configuration),
    }
    assets = asset_graph(chosen)
    running = platform.automation == "running"
    definitions = dg.Definitions(
        assets=assets,
        asset_checks=CHECKS,
        resources=resources,
        jobs=[*(automation.dpo_job(e.name) for e in chosen), automation.report_job],
        schedules=[
            automation.build_add_seeds_schedule(e.name, platform.seed_schedule_cron, platform.seeds_per_tick, running)
            for e in chosen
        ],
        sensors=[
            automation.build_new_cells_sensor([e.name for e in chosen], running),
            automation.build_report_sensor([keys.group_dpo_run(e.name) for e in chosen], running),
            automation.build_orphans_sensor(resources["dpo_storage"].runs_dir, running),
        ],
    )
    return CodeLocation(configuration, chosen, assets, resources, definitions)
