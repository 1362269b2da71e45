"""The write-up a researcher reads, built from the assets' values (README, "The write-up").

Owns its layout — setup, splits, baseline, group comparison, one table per split, the correspondence check, the
experiments compared, observations derived by rule — and its two renderings: markdown with its figures beside it,
and one self-contained HTML file with the figures inline. No Dagster: `assets/report.py` feeds it.
"""

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from prism_assets import plots
from prism_assets.statistics import correspondence

# The original write-up's per-split table, then the held-out metrics this platform adds (the primary first).
DETAIL_METRICS = {
    "final_loss": "final loss",
    "final_margin": "final margin",
    "mean_loss_tail": "loss (tail mean)",
    "mean_margin_tail": "margin (tail mean)",
    "mean_pref_acc_tail": "train-batch accuracy (tail mean)",
    "steps_to_60pct": "steps to 60% train-batch accuracy",
    "mean_heldout_acc_tail": "held-out accuracy (tail mean), primary",
    "mean_heldout_margin_tail": "held-out margin (tail mean)",
}


# ---- the document: blocks, rendered as markdown or as HTML ----


@dataclass
class Document:
    blocks: list[tuple] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)  # file name → PNG

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", items))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, name: str, png: bytes, caption: str) -> None:
        self.figures[name] = png
        self.blocks.append(("figure", name, caption))

    def markdown(self, figures_dir: str | None) -> str:
        """Markdown; figures are linked as `<figures_dir>/<name>`, or inline (data URIs) without a directory."""
        out = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                out.append("#" * rest[0] + " " + rest[1])
            elif kind == "paragraph":
                out.append(rest[0])
            elif kind == "bullets":
                out.append("\n".join(f"- {item}" for item in rest[0]))
            elif kind == "table":
                # A cell's own "|" (a group of several levels) would end the cell.
                cells = rest[0].astype(str).map(lambda text: text.replace("|", "\\|"))
                out.append(cells.to_markdown(index=False, disable_numparse=True))
            elif figures_dir is None:
                out.append(plots.markdown_image(self.figures[rest[0]], rest[1]))
            else:
                out.append(f"![{rest[1]}]({figures_dir}/{rest[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        """One HTML file that needs nothing beside it: figures as data URIs, the style inline."""
        body = []
        for kind, *rest in self.blocks:
            if kind == "heading":
                body.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline(rest[0])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in rest[0]) + "</ul>")
            elif kind == "table":
                body.append(rest[0].to_html(index=False, border=0, escape=True))
            else:
                data = base64.b64encode(self.figures[rest[0]]).decode()
                caption = html.escape(rest[1])
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}'
                    "</figcaption></figure>"
                )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;"
    "text-align:left}th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}"
    "figcaption{font-size:.85em;color:#555}"
)


def _inline(text: str) -> str:
    """The markdown this document's text uses inline (**bold**, `code`), as HTML."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


# ---- numbers over seeds ----


def seed_interval(values) -> tuple[float, float, float, int]:
    """(mean, 95% CI low, high, n) over seeds: Student's t with n − 1 df; no interval below two seeds. Missing
    values (a run that never reached 60%) are left out of n."""
    values = pd.Series(values, dtype="float64").dropna()
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def format_interval(mean: float, low: float, high: float, signed: bool = False, digits: int = 3) -> str:
    """`mean [low, high]`, the way every number over seeds is written in the write-up."""
    spec = f"{'+' if signed else ''}.{digits}f"
    if pd.isna(mean):
        return "—"
    if pd.isna(low):
        return format(mean, spec)
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def digits_of(metric: str) -> int:
    """Decimals a metric is written with: steps with one, everything else (losses, margins, rates) with three."""
    return 1 if metric.startswith("steps") else 3


def metric_summary(runs: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    """One row per metric: mean, CI and seeds of these runs (one per seed)."""
    rows = []
    for metric, label in metrics.items():
        mean, low, high, n = seed_interval(runs[metric]) if metric in runs else (math.nan,) * 3 + (0,)
        rows.append({"metric": metric, "label": label, "mean": mean, "ci_low": low, "ci_high": high, "n": n})
    return pd.DataFrame(rows)


def split_detail(runs: pd.DataFrame, split: str, metrics: dict[str, str]) -> pd.DataFrame:
    """Per metric: group A's and B's mean and CI over seeds, and A − B over the seeds both have (paired)."""
    rows = []
    mine = runs[runs["split"] == split]
    for metric, label in metrics.items():
        wide = mine.pivot_table(index="seed", columns="group", values=metric, aggfunc="first", dropna=False)
        a = wide["A"] if "A" in wide else pd.Series(dtype="float64")
        b = wide["B"] if "B" in wide else pd.Series(dtype="float64")
        row: dict = {"split": split, "metric": metric, "label": label}
        for name, values in (("a", a), ("b", b), ("d", a - b)):
            mean, low, high, n = seed_interval(values)
            row.update({f"{name}_mean": mean, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": n})
        rows.append(row)
    return pd.DataFrame(rows)


# ---- what each experiment brings ----


@dataclass
class ExperimentResults:
    """One experiment's inputs to the write-up: its settings as its runs had them and every table the assets computed
    for it, with what those rest on."""

    name: str
    description: str
    base_model: str
    hyperparameters: dict  # the runs' own (run.json), not today's environment's
    spec: dict  # boundaries, alpha, preset, random_splits, min group sizes (today's experiments file)
    basis: dict  # correspondence_table's basis: runs, seeds, random splits, completeness, data, α and min_effect used
    current_settings: bool  # whether the runs' settings are the code location's today
    fit: dict  # ordered_logit_fit's value
    splits: pd.DataFrame  # significant_splits' split table
    table: pd.DataFrame  # correspondence_table's rows of this experiment (every metric)
    runs: pd.DataFrame  # its runs (one row per cell and seed, with every metric)
    curves: pd.DataFrame  # their learning curves


@dataclass
class Writeup:
    document: Document
    tables: dict[str, pd.DataFrame]  # the numbers the document shows, as data (asset value, tests)


def build(
    data: dict,
    experiments: list[ExperimentResults],
    comparison: pd.DataFrame,
    curve_metric: str = "pref_acc",
    complete: bool = True,
) -> Writeup:
    """The whole write-up. `data`: counts of the PRISM data and its pairs (`source`, `synthetic`, `survey`,
    `conversations`, `utterances`, `pairs`, `users_with_pairs`, `digest`); `complete`: every experiment's grid is."""
    doc = Document()
    tables: dict[str, list[pd.DataFrame]] = {
        "baseline": [],
        "detail": [],
        "summary": [],
        "mechanism": [],
        "secondary": [],
    }
    doc.heading(1, "Do groups that prefer more strongly also differ in how DPO learns from them?")
    if not complete:
        partial = [f"{e.name}: {e.basis['reason']}" for e in experiments if not e.basis["complete"]]
        doc.paragraph(
            "**A partial grid: no verdicts.** " + "; ".join(partial) + ". The runs missing (failed, or not yet "
            "run) are listed under each experiment; the last complete write-up, if any, is report.md beside this file."
        )
    doc.paragraph(
        "Within-model preference pairs of PRISM; an ordered logit of the score gap on user covariates; splits of "
        "users from its significant covariates, a null-control split (region) and random splits (the calibrated "
        "null); DPO on each group's pairs over several seeds, each seed holding out its own users; does the groups' "
        "DPO difference follow the predicted direction? Every number below comes from the platform's assets; "
        "numbers over seeds are the mean with a 95% interval."
    )
    doc.heading(2, "Data")
    doc.bullets(_data_lines(data, experiments))
    observations = []
    for experiment in experiments:
        observations += _experiment_sections(doc, tables, experiment, curve_metric)
    doc.heading(2, "Experiments compared")
    if comparison.empty:
        doc.paragraph("No split is shared by two experiments (the same users in each group).")
    else:
        doc.paragraph(
            "Every split two experiments share by definition (the same users in group A and in group B, whatever "
            f"each calls it), on the primary metric ({correspondence.METRICS[correspondence.PRIMARY_METRIC]}): "
            "each one's mean A − B with its calibrated 95% CI and verdict. Where both rest on the very same runs the "
            'numbers are one measurement ("same runs": only the predictions differ); otherwise whether the '
            "direction is stable or flips."
        )
        doc.table(comparison_display(comparison))
        doc.figure(
            "comparison.png",
            plots.comparison_plot(comparison, correspondence.METRICS[correspondence.PRIMARY_METRIC]),
            "the shared splits' mean A − B in each experiment",
        )
    observations += _comparison_observations(comparison)
    doc.heading(2, "Observations")
    doc.paragraph("Derived by rule from the tables above.")
    doc.bullets(observations)
    frames = {name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame() for name, parts in tables.items()}
    return Writeup(doc, frames)


def _data_lines(data: dict, experiments: list[ExperimentResults]) -> list[str]:
    lines = [
        f"Source: `{data['source']}`" + (" — **synthetic**, with planted effects" if data.get("synthetic") else ""),
        f"{data['survey']:,} participants, {data['conversations']:,} conversations, "
        f"{data['utterances']:,} scored responses ({data['dropped_rows']:,} rows dropped on loading, by reason in "
        "`raw_prism`'s metadata)",
        f"{data['pairs']:,} within-model preference pairs from {data['users_with_pairs']:,} participants "
        f"(score gap: median {data['median_gap']:.0f}, mean {data['mean_gap']:.1f}); pairs version "
        f"`{data['digest'][:12]}`",
    ]
    stale = [e.name for e in experiments if e.basis["data_digest"] != data["digest"]]
    if stale:
        lines.append(
            f"**The tables of {', '.join(stale)} rest on other pairs than these** (version "
            f"`{experiments[0].basis['data_digest'][:12]}`): rematerialize correspondence_table (and the runs)."
        )
    return lines


def _basis_lines(e: ExperimentResults) -> list[str]:
    """What the experiment's numbers rest on, and what is missing or left out."""
    basis = e.basis
    seeds = json.loads(basis["seeds"])
    lines = [
        f"{basis['runs']} runs, seeds {', '.join(map(str, seeds)) or 'none'}: {basis['splits_done']} of "
        f"{basis['splits_expected']} splits (the predicted ones and the null control) and {basis['random_done']} of "
        f"{basis['random_expected']} random splits with every seed; pairs version `{basis['data_digest'][:12]}`",
        f"Verdicts at Holm-adjusted p < {basis['verdict_alpha']:g}; the power line is for |A − B| = "
        f"{basis['min_effect']:g}; each seed holds out {basis['heldout_share']:.0%} of the users",
    ]
    if basis["reason"]:
        lines.append(f"**{basis['reason']}: no verdicts** (estimates and intervals are still shown)")
    missing = json.loads(basis["missing"])
    if missing:
        shown = ", ".join(missing[:30]) + (f" and {len(missing) - 30} more" if len(missing) > 30 else "")
        lines.append(f"Missing runs (failed, or not yet run): {shown}")
    for reason, which in json.loads(basis["left_out"]).items():
        lines.append(f"Left out, {reason}: {', '.join(which[:20])}" + (" …" if len(which) > 20 else ""))
    if not e.current_settings:
        lines.append(
            "**These runs' DPO settings are not the code location's today** (its settings changed since the table "
            "was built): rematerialize correspondence_table and the runs it leaves out"
        )
    return lines


def _experiment_sections(doc: Document, tables: dict, e: ExperimentResults, curve_metric: str) -> list[str]:
    primary = e.table[e.table["metric"] == correspondence.PRIMARY_METRIC]
    seeds = sorted(e.runs["seed"].unique().tolist()) if len(e.runs) else []
    doc.heading(2, f"Experiment {e.name}")
    if e.description != e.name:
        doc.paragraph(e.description)

    doc.heading(3, "What the numbers rest on")
    doc.bullets(_basis_lines(e))

    doc.heading(3, "Setup")
    boundaries = ", ".join(f"{b:g}" for b in e.fit["boundaries"])
    honest = e.spec.get("discovery_share")
    doc.bullets(
        [
            f"Split model: ordered logit of the score gap binned at {boundaries} "
            f"({len(e.fit['boundaries']) + 1} outcome levels; clustered by user), on {e.fit['num_pairs']:,} pairs "
            f"of {e.fit['num_users']:,} users; {'converged' if e.fit['converged'] else '**did not converge**'}",
            f"Splits: preset `{e.spec['preset']}`, α {e.spec['alpha']:g} for a covariate; "
            f"{e.basis['random_expected']} random splits",
            *(
                [
                    f"Honest mode: the logit is fitted on {honest:.0%} of the users (discovery); DPO trains and is "
                    "evaluated on the others (confirmation) only"
                ]
                if honest
                else []
            ),
            f"Model: `{e.base_model}` (the runs' own settings, from their run.json)",
            f"Seeds: {', '.join(map(str, seeds)) or 'none yet'} ({len(e.runs)} runs)",
        ]
    )
    doc.table(pd.DataFrame({"hyperparameter": list(e.hyperparameters), "value": map(str, e.hyperparameters.values())}))
    significant = e.fit["coefficients"][e.fit["coefficients"]["p"] < e.spec["alpha"]]
    doc.paragraph(f"Terms of the ordered logit with p < {e.spec['alpha']:g} (β > 0: larger score gaps):")
    doc.table(
        pd.DataFrame(
            {
                "term": significant["term"],
                "β [95% CI]": [
                    format_interval(mean, low, high, signed=True)
                    for mean, low, high in significant[["beta", "ci_low", "ci_high"]].values
                ],
                "p": significant["p"].map(lambda p: f"{p:.3g}"),
            }
        )
        if len(significant)
        else pd.DataFrame({"term": ["none"]})
    )

    doc.heading(3, "Splits")
    doc.table(
        pd.DataFrame(
            {
                "split": e.splits["split"],
                "group A": e.splits["group_a"],
                "group B": e.splits["group_b"],
                "predicted": e.splits["predicted"],
                "users A / B": [f"{a:,} / {b:,}" for a, b in zip(e.splits["users_a"], e.splits["users_b"])],
                "pairs A / B": [f"{a:,} / {b:,}" for a, b in zip(e.splits["pairs_a"], e.splits["pairs_b"])],
                "trained": e.splits["trained"].map({True: "yes", False: "no: too small"})
                if "trained" in e.splits
                else "yes",
            }
        )
    )

    doc.heading(3, "Baseline")
    baseline = metric_summary(e.runs[e.runs["cell"] == "baseline"], DETAIL_METRICS).assign(experiment=e.name)
    tables["baseline"].append(baseline)
    doc.paragraph("DPO on every pair but its seed's held-out users', the runs every split's groups are read against:")
    doc.table(
        pd.DataFrame(
            {
                "metric": baseline["label"],
                "mean [95% CI]": [
                    format_interval(mean, low, high, digits=digits_of(metric))
                    for mean, low, high, metric in baseline[["mean", "ci_low", "ci_high", "metric"]].values
                ],
                "seeds": baseline["n"],
            }
        )
    )

    doc.heading(3, "Group comparison summary")
    tables["summary"].append(primary.assign(experiment=e.name))
    doc.paragraph(
        f"Primary metric, {correspondence.METRICS[correspondence.PRIMARY_METRIC]}: each group's models on the pairs "
        "of its own held-out users, A − B per seed and its mean, with the 95% CI on the calibrated null's scale and a "
        "bootstrap interval over seeds and held-out users that assumes no distribution; z against the K random "
        "splits, p Holm-adjusted over the experiment's predicted splits (and the rank p where K ≥ 19), the verdict, "
        "the K and seeds it rests on, and the power line (docs/statistics.md)."
    )
    doc.table(summary_display(primary))

    doc.heading(3, "Per split")
    doc.paragraph(
        "Each group's mean over seeds and A − B over the seeds both groups have (paired), with 95% t-intervals over "
        "seeds (steps to 60%: over the seeds that reached it); then the 2×2 of models × held-out pairs: where A − B "
        "lies in the pairs (every model finds one group's pairs easier) and where in what each group's models "
        "learned. Random splits are in the summary only."
    )
    detailed = e.splits[~e.splits["random"]] if "random" in e.splits else e.splits
    for split in detailed.itertuples():
        detail = split_detail(e.runs, split.split, DETAIL_METRICS).assign(experiment=e.name)
        tables["detail"].append(detail)
        found = primary[primary["split"] == split.split]
        doc.heading(4, f"{split.split} (predicted {split.predicted})")
        row = found.iloc[0] if len(found) else None
        verdict = row["verdict"] if row is not None else "no runs"
        rests = f" ({_rests_on(row)})" if row is not None and row["n_seeds"] else ""
        doc.paragraph(f"A: {split.group_a}; B: {split.group_b}. Verdict: **{verdict}**{rests}.")
        doc.table(detail_display(detail))
        if row is not None and not pd.isna(row.get("acc_aa")):
            mech = mechanism_display(row)
            tables["mechanism"].append(mech.assign(experiment=e.name, split=split.split))
            doc.table(mech)
            doc.paragraph(mechanism_sentence(row))
        if row is not None:
            doc.paragraph(f"Power: {power_line(row)}.")

    doc.heading(3, "Secondary metrics (exploratory)")
    doc.paragraph(
        "Other readings of the same runs, as estimates with 95% t-intervals over seeds and no verdict: they are "
        "correlated with the primary metric and with each other, and counting them as support would count one "
        "result several times."
    )
    secondary = e.table[e.table["metric"].isin(correspondence.SECONDARY) & ~e.table["random"]]
    tables["secondary"].append(secondary.assign(experiment=e.name))
    doc.table(secondary_display(secondary))
    curves = e.curves[e.curves["split"].notna()] if len(e.curves) else e.curves
    if len(curves):
        doc.figure(
            f"{e.name}_learning_curves.png",
            plots.learning_curve_plot(curves, e.splits, curve_metric),
            f"{e.name}: {curve_metric} over training, groups A and B (mean, min–max over seeds)",
        )
    if len(primary) and primary["z"].notna().any():
        doc.figure(
            f"{e.name}_null.png",
            plots.null_plot(
                primary, correspondence.METRICS[correspondence.PRIMARY_METRIC], float(e.basis["verdict_alpha"])
            ),
            f"{e.name}: each split's z against the random splits'",
        )
    return experiment_observations(e.name, e.table, e.basis)


def _rests_on(row) -> str:
    k = "—" if pd.isna(row.get("null_df")) else f"{int(row['null_df'])}"
    return f"{int(row['n_seeds'])} seeds, K = {k} random splits"


def summary_display(primary: pd.DataFrame) -> pd.DataFrame:
    def p(value):
        return "—" if pd.isna(value) else f"{value:.3g}"

    display = pd.DataFrame(
        {
            "split": primary["split"],
            "predicted": primary["predicted"],
            "per-seed A−B": primary["per_seed_d"].map(lambda v: ", ".join(f"{x:+.3f}" for x in v)),
            "mean A−B [95% CI]": [
                format_interval(mean, low, high, signed=True) if n else "no runs"
                for mean, low, high, n in primary[["mean_d", "ci_low", "ci_high", "n_seeds"]].values
            ],
            "bootstrap 95%": [
                "—" if pd.isna(low) else f"[{low:+.3f}, {high:+.3f}]"
                for low, high in primary[["boot_low", "boot_high"]].values
            ],
            "z": primary["z"].map(lambda v: "—" if pd.isna(v) else f"{v:+.2f}"),
            "p (Holm)": primary["p_adjusted"].map(p),
            "verdict": primary["verdict"],
            "seeds / K": [f"{n} / {'—' if pd.isna(k) else int(k)}" for n, k in primary[["n_seeds", "null_df"]].values],
            "power": [power_line(row) for _, row in primary.iterrows()],
        }
    )
    if primary["p_rank"].notna().any():
        display.insert(7, "p (rank)", primary["p_rank"].map(p))
    return display


def estimate_display(rows: pd.DataFrame) -> pd.DataFrame:
    """A secondary metric's rows: per-seed A − B and the mean with its t-interval over seeds."""
    return pd.DataFrame(
        {
            "split": rows["split"],
            "per-seed A−B": rows["per_seed_d"].map(lambda v: ", ".join(f"{x:+.3f}" for x in v)),
            "mean A−B [95% CI]": [
                format_interval(mean, low, high, signed=True) if n else "no runs"
                for mean, low, high, n in rows[["mean_d", "ci_low", "ci_high", "n_seeds"]].values
            ],
        }
    )


def secondary_display(rows: pd.DataFrame) -> pd.DataFrame:
    """split × secondary metric: mean A − B [95% CI over seeds]."""
    cells = rows.assign(
        cell=[
            format_interval(mean, low, high, signed=True) if n else "—"
            for mean, low, high, n in rows[["mean_d", "ci_low", "ci_high", "n_seeds"]].values
        ]
    )
    wide = cells.pivot(index="split", columns="metric", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(rows["split"])), columns=correspondence.SECONDARY)
    wide.columns = [re.sub(", the original metric$", "", correspondence.METRICS[m]) for m in wide.columns]
    return wide.reset_index()


def mechanism_display(row) -> pd.DataFrame:
    """The 2×2 of models × held-out pairs (mean over seeds), the baseline's reading of both, and the two parts."""

    def f(value) -> str:
        return "—" if pd.isna(value) else f"{value:.3f}"

    return pd.DataFrame(
        {
            "models": ["A's", "B's", "the baseline's"],
            "on A's held-out pairs": [f(row["acc_aa"]), f(row["acc_ba"]), f(row["acc_0a"])],
            "on B's held-out pairs": [f(row["acc_ab"]), f(row["acc_bb"]), f(row["acc_0b"])],
        }
    )


def mechanism_sentence(row) -> str:
    return (
        f"A − B {row['mean_d']:+.3f} = {row['pairs_part']:+.3f} in the pairs (every model's accuracy on A's pairs "
        f"minus on B's, averaged over A's and B's models) {row['model_part']:+.3f} in what the models learned "
        f"(A's models minus B's, on both groups' pairs); the baseline finds A's pairs "
        f"{row['acc_0a'] - row['acc_0b']:+.3f} easier."
    )


def power_line(row) -> str:
    if pd.isna(row.get("mde")):
        return "—"
    seeds = row["n_seeds"] or row.get("planned_seeds")
    line = f"MDE {row['mde']:.3f} with {seeds:.0f} seeds" + (" (not trained)" if row["n_seeds"] == 0 else "")
    effect = row.get("min_effect")
    if pd.isna(effect):
        return line
    if np.isinf(row["seeds_needed"]):
        return (
            f"{line}; {effect:.2f} is beyond seeds: groups of these users differ by ±{np.sqrt(row['omega2']):.3f} on "
            f"their own (the random splits), and with every user held out once the MDE stays above "
            f"{row['heldout_floor']:.3f}"
        )
    needs = [f"{row['seeds_needed']:.0f} seeds"]
    if not pd.isna(row.get("heldout_share_needed")):
        needs.append(f"a held-out share of {row['heldout_share_needed']:.2f} at these seeds")
    if not np.isinf(row.get("random_splits_needed", np.inf)):
        needs.append(f"K = {row['random_splits_needed']:.0f} random splits at these seeds")
    return f"{line}; {effect:.2f} needs " + ", or ".join(needs)


def detail_display(detail: pd.DataFrame) -> pd.DataFrame:
    def column(name: str, signed: bool = False) -> list[str]:
        return [
            format_interval(mean, low, high, signed=signed, digits=digits_of(metric))
            + (f" ({n} seeds)" if metric.startswith("steps") else "")
            for mean, low, high, n, metric in detail[
                [f"{name}_mean", f"{name}_ci_low", f"{name}_ci_high", f"{name}_n", "metric"]
            ].values
        ]

    return pd.DataFrame(
        {"metric": detail["label"], "A": column("a"), "B": column("b"), "A − B": column("d", signed=True)}
    )


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    def ci(mean, low, high):
        return format_interval(mean, low, high, signed=True)

    return pd.DataFrame(
        {
            "experiments": comparison["experiment_1"] + " / " + comparison["experiment_2"],
            "split": comparison["split_1"] + " / " + comparison["split_2"],
            "predicted": comparison["predicted_1"] + " / " + comparison["predicted_2"],
            "mean A−B [95% CI] (1)": [
                ci(*v) for v in zip(comparison["mean_d_1"], comparison["ci_low_1"], comparison["ci_high_1"])
            ],
            "mean A−B [95% CI] (2)": [
                ci(*v) for v in zip(comparison["mean_d_2"], comparison["ci_low_2"], comparison["ci_high_2"])
            ],
            "verdicts": comparison["verdict_1"] + " / " + comparison["verdict_2"],
            "direction": comparison["direction"],
        }
    )


# ---- observations, by rule ----


def experiment_observations(name: str, table: pd.DataFrame, basis: dict) -> list[str]:
    """What the table says, in sentences: the verdicts on the primary metric (or why there are none), the null
    control, and what it would take to detect `min_effect`."""
    primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
    predicted = primary[~primary["random"] & ~primary["null_control"]]
    lines = []
    if basis["reason"]:
        lines.append(f"{name}: **{basis['reason']}** — no verdicts; the estimates stand as estimates.")
    for verdict in (correspondence.MATCH, correspondence.MISMATCH):
        rows = predicted[predicted["verdict"] == verdict]
        if len(rows):
            lines.append(
                f"{name}: **{verdict}** on the primary metric: "
                + "; ".join(
                    f"{r.split} (mean A − B {r.mean_d:+.3f}, Holm p {r.p_adjusted:.3g}; {_rests_on(r._asdict())})"
                    for r in rows.itertuples()
                )
            )
    decided = predicted["verdict"].isin([correspondence.MATCH, correspondence.MISMATCH])
    if not basis["reason"] and not decided.any():
        lines.append(f"{name}: no predicted split is MATCH or MISMATCH on the primary metric.")
    for row in primary[primary["null_control"]].itertuples():
        if row.verdict == correspondence.NULL_OK:
            lines.append(
                f"{name}: the null control {row.split} looks like a random split (Holm p {row.p_adjusted:.3g}): "
                "the null holds."
            )
        elif row.verdict == correspondence.NULL_NOT_OK:
            lines.append(
                f"{name}: the null control {row.split} is **{row.verdict}** (Holm p {row.p_adjusted:.3g}): it "
                "stands out from the random splits, so every other verdict deserves suspicion."
            )
    untrained = predicted[predicted["verdict"] == correspondence.calibration.NOT_TRAINED]
    if len(untrained):
        lines.append(f"{name}: not trained, a group too small: {', '.join(untrained['split'])}.")
    undecided = predicted[~decided & (predicted["n_seeds"] > 0) & predicted["mde"].notna()]
    effect = basis["min_effect"]
    reachable = undecided[np.isfinite(undecided["seeds_needed"].astype(float))]
    beyond = undecided[np.isinf(undecided["seeds_needed"].astype(float))]
    if len(reachable):
        lines.append(
            f"{name}: to detect |A − B| = {effect:g} with 80% power: "
            + ", ".join(f"{r.split} {r.seeds_needed:.0f} seeds (MDE now {r.mde:.3f})" for r in reachable.itertuples())
            + "."
        )
    if len(beyond):
        lines.append(
            f"{name}: |A − B| = {effect:g} is beyond any number of seeds for "
            + ", ".join(f"{r.split} (floor {r.heldout_floor:.3f})" for r in beyond.itertuples())
            + ": groups of these users differ on their own (the random splits show by how much), and held-out users "
            "run out; more users, or more random splits (a smaller λ), would."
        )
    return lines


def _comparison_observations(comparison: pd.DataFrame) -> list[str]:
    if comparison.empty:
        return []
    lines = []
    for (first, second), rows in comparison.groupby(["experiment_1", "experiment_2"], sort=False):
        same = rows[rows["direction"] == "same runs"]
        measured = rows[rows["direction"] != "same runs"]
        flips = measured[measured["direction"] == "flip"]
        parts = [f"{first} and {second} share {len(rows)} splits"]
        if len(same):
            parts.append(
                f"{len(same)} on the very same runs ({', '.join(same['split_1'])}: one measurement, read against "
                "each experiment's prediction)"
            )
        if len(measured):
            parts.append(
                f"of the {len(measured)} measured apart, "
                + (
                    "every direction is stable"
                    if flips.empty
                    else "the direction flips on "
                    + ", ".join(f"{a}/{b}" for a, b in zip(flips["split_1"], flips["split_2"]))
                )
            )
        disagree = rows[~rows["verdicts_agree"].astype(bool)]
        if len(disagree):
            parts.append(
                "the verdicts differ on "
                + ", ".join(f"{r.split_1}/{r.split_2} ({r.verdict_1} / {r.verdict_2})" for r in disagree.itertuples())
            )
        lines.append("; ".join(parts) + ".")
    return lines
