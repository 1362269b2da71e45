"""One v3 `group_dpo_run` partition through the SLURM launcher, as a Dagster process of its own, for the tests of
what survives that process: `python slurm_partition.py <dir> <cell> <max steps> [<job python>]`. The instance
(sqlite under <dir>/home) and the storage (<dir>) persist, so a second process launches the same partition again;
the first one materializes the upstream assets. Cell `reference`: the upstream assets alone, reference_logps
the partition. Prints one JSON line: success and the partition's metadata or failure."""

import json
import signal
import sys
from pathlib import Path

import dagster as dg
from builders import upstream_of_runs
from test_dpo_assets import _definitions, _materialize_partition

from prism_assets import partitions
from resources.slurm import SlurmLauncher


def main(root: Path, cell: str, max_steps: int, python: str | None) -> None:
    assets, resources = _definitions(root, python=python, max_steps=max_steps, logging_steps=max(1, max_steps // 10))
    resources["launcher"] = SlurmLauncher(
        partition="debug", cpus_per_task=1, mem=None, gpus=1, time_limit="10", poll_initial_s=0.5, poll_max_s=1.0
    )
    (root / "home").mkdir(parents=True, exist_ok=True)
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        if cell == "reference":
            result = dg.materialize(
                upstream_of_runs(assets), instance=instance, resources=resources, raise_on_error=False
            )
        else:
            if not instance.get_dynamic_partitions(partitions.SEED):  # the first process: the upstream assets too
                dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
                instance.add_dynamic_partitions(partitions.SEED, ["0"])
            result = _materialize_partition(assets, resources, instance, cell, 0, raise_on_error=False)
        report: dict = {"success": result.success}
        if result.success:
            [event] = [
                e
                for e in result.get_asset_materialization_events()
                if cell != "reference" or (e.asset_key is not None and e.asset_key.path[0] == "reference_logps")
            ]
            report["metadata"] = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
        else:
            [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
            error = failure.step_failure_data.error
            report["failure"] = error.message if error else "a step failed"
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    # SIGINT interrupts the run as in a terminal, even when started from a shell that ignores it for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
