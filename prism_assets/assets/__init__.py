"""The asset graph of a set of experiments: the shared data, one reference per base model, each experiment's
statistics and DPO runs, and the table over all of them."""

import dagster as dg

from prism_assets import keys, versions
from prism_assets.assets import data, dpo, report, stats, table
from prism_assets.experiments import Experiment


def asset_graph(experiments: list[Experiment]) -> list[dg.AssetsDefinition]:
    """Every asset of these experiments, code versions folding in their upstream code's."""
    references = {keys.reference_logps(e.settings): dpo.build_reference_logps(e.settings) for e in experiments}
    return versions.with_upstream_code_versions(
        [
            data.raw_prism,
            data.within_model_pairs,
            *references.values(),
            *(asset for e in experiments for asset in stats.build_statistics(e)),
            *(dpo.build_group_dpo_run(e.name, e.settings) for e in experiments),
            table.build_correspondence_table(experiments),
            report.build_research_report(experiments),
        ]
    )
