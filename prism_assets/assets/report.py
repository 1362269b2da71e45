"""`research_report`: the write-up researchers read, for every experiment (`writeup`), as markdown and HTML.

Owns where the write-up is written and when: `report.md` and `report.html` under `reports_dir`, made again only when
what they are made of changed (a digest of their inputs), and — while any experiment's grid is partial — as
`report.partial.md` / `.html` beside the last complete write-up, which stays as it was.
"""

import hashlib
import json
import sys
from pathlib import Path

import dagster as dg
import pandas as pd

from prism_assets import keys, plots, versions, writeup
from prism_assets.assets.table import ReportConfig
from prism_assets.experiments import Experiment
from prism_assets.statistics import correspondence
from prism_assets.training import run_folder as folder
from prism_assets.training.run_folder import write_atomic
from prism_assets.training.settings import fingerprint
from resources.prism_source import SYNTHETIC
from resources.storage import DpoStorage

REPORT_FILES = {"markdown": "report.md", "html": "report.html", "figures": "figures"}
PARTIAL_FILES = {"markdown": "report.partial.md", "html": "report.partial.html", "figures": "figures"}


def build_research_report(experiments: list[Experiment]) -> dg.AssetsDefinition:
    """`research_report`: the write-up of every experiment (`writeup`), as markdown and self-contained HTML under
    `reports_dir`. Materialized again only when what it is made of changed (a digest of its inputs)."""
    ins = {
        "correspondence_table": dg.AssetIn(),
        "raw_prism": dg.AssetIn(),
        "within_model_pairs": dg.AssetIn(),
        **{f"{e.name}__fit": dg.AssetIn(key=keys.ordered_logit_fit(e.name)) for e in experiments},
        **{f"{e.name}__splits": dg.AssetIn(key=keys.significant_splits(e.name)) for e in experiments},
    }
    code_version = versions.source_version(sys.modules[__name__], writeup, plots, correspondence)
    described = {
        e.name: {"settings": fingerprint(e.settings), "spec": e.spec.model_dump(mode="json")} for e in experiments
    }
    code_version += "-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:8]

    @dg.asset(
        group_name="report",
        kinds={"html"},
        owners=versions.OWNERS,
        code_version=code_version,
        ins=ins,
        output_required=False,  # nothing new to say: no new materialization
        description="The write-up researchers read, for every experiment: setup, splits, baseline, group comparison, "
        "a table per split, the correspondence check, the experiments compared and observations. Markdown and a "
        "self-contained HTML file under storage/reports/.",
    )
    def research_report(context: dg.AssetExecutionContext, config: ReportConfig, dpo_storage: DpoStorage, **inputs):
        table = inputs["correspondence_table"]
        pairs, raw = inputs["within_model_pairs"], inputs["raw_prism"]
        data = {
            "digest": folder.pairs_digest(pairs["pair_id"], folder.text_digests(pairs)),
            "source": raw["source"],
            "synthetic": str(raw["source"]).startswith(SYNTHETIC),
            "dropped_rows": int(sum(raw["dropped"].values())),
            "survey": len(raw["survey"]),
            "conversations": len(raw["conversations"]),
            "utterances": len(raw["utterances"]),
            "pairs": len(pairs),
            "users_with_pairs": int(pairs["user_id"].nunique()),
            "median_gap": float(pairs["score_gap"].median()),
            "mean_gap": float(pairs["score_gap"].mean()),
        }
        results = [
            _experiment_results(e, table, inputs[f"{e.name}__fit"], inputs[f"{e.name}__splits"]["splits"])
            for e in experiments
            if (table["table"]["experiment"] == e.name).any()
        ]
        digest = _digest(code_version, config.curve_metric, data, table, [r.fit for r in results], results)
        complete = all(r.basis["complete"] for r in results)
        reports = Path(dpo_storage.reports_dir)
        paths = {kind: reports / name for kind, name in (REPORT_FILES if complete else PARTIAL_FILES).items()}
        if not complete:
            context.log.warning(
                f"a partial grid: the write-up goes to {paths['markdown']}; the last complete one, "
                f"{reports / REPORT_FILES['markdown']}, is left as it was"
            )
        latest = context.instance.get_latest_materialization_event(context.asset_key)
        last = (
            latest.asset_materialization.metadata.get("inputs_digest")
            if latest and latest.asset_materialization
            else None
        )
        if last is not None and last.value == digest and paths["markdown"].exists() and paths["html"].exists():
            context.log.info(f"research_report: its inputs are unchanged since {paths['markdown']} was written; kept")
            return
        built = writeup.build(data, results, table["comparison"], config.curve_metric, complete)
        paths["figures"].mkdir(parents=True, exist_ok=True)
        for name, png in built.document.figures.items():
            (paths["figures"] / name).write_bytes(png)
        write_atomic(paths["markdown"], built.document.markdown(REPORT_FILES["figures"]))
        write_atomic(
            paths["html"],
            built.document.html("PRISM DPO splits: the write-up" + ("" if complete else " (partial grid)")),
        )
        if complete:  # a partial write-up of an earlier grid no longer stands beside this one
            for name in ("markdown", "html"):
                (reports / PARTIAL_FILES[name]).unlink(missing_ok=True)
        context.log.info(f"research_report written: {paths['html']}")
        yield dg.Output(
            {**built.tables, "markdown": str(paths["markdown"]), "html": str(paths["html"]), "inputs_digest": digest},
            data_version=dg.DataVersion(digest),
            metadata={
                "html": dg.MetadataValue.path(str(paths["html"])),
                "markdown": dg.MetadataValue.path(str(paths["markdown"])),
                "inputs_digest": digest,
                "complete": complete,
                "experiments": dg.MetadataValue.json([r.name for r in results]),
                "report": dg.MetadataValue.md(built.document.markdown(None)),
            },
        )

    return research_report


def _experiment_results(
    experiment: Experiment, table: dict, fit: dict, splits: pd.DataFrame
) -> writeup.ExperimentResults:
    """One experiment's part of the table, with what it rests on: the runs' own settings (not today's), and where
    today's settings differ from theirs."""
    name = experiment.name
    basis = table["basis"].set_index("experiment").loc[name].to_dict()
    settings = json.loads(basis["settings"])
    return writeup.ExperimentResults(
        name=name,
        description=experiment.description,
        base_model=str(settings.get("base_model", experiment.settings.base_model)),
        hyperparameters={k: v for k, v in settings.items() if k != "base_model"},
        spec=experiment.spec.model_dump(),
        basis=basis,
        current_settings=basis["settings_fingerprint"] == fingerprint(experiment.settings),
        fit=fit,
        splits=splits,
        table=table["table"][table["table"]["experiment"] == name].reset_index(drop=True),
        runs=table["runs"][table["runs"]["experiment"] == name].reset_index(drop=True),
        curves=table["curves"][table["curves"]["experiment"] == name].reset_index(drop=True),
    )


def _digest(*parts) -> str:
    """A digest of what the write-up is made of: DataFrames by their JSON, everything else by its repr."""

    def canonical(value):
        if isinstance(value, pd.DataFrame):
            return value.to_json(orient="split", date_format="iso", default_handler=str)
        if isinstance(value, dict):
            return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, list | tuple):
            return [canonical(v) for v in value]
        if isinstance(value, writeup.ExperimentResults):
            return canonical(vars(value))
        return repr(value)

    return hashlib.sha256(json.dumps(canonical(list(parts))).encode()).hexdigest()[:24]
