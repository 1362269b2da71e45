"""The write-up a researcher reads, built from the assets' values (README, "The write-up").

Owns its layout — setup, splits, baseline, group comparison, one table per split, the correspondence check, the
experiments compared, observations derived by rule — and its two renderings: markdown with its figures beside it,
and one self-contained HTML file with the figures inline. No Dagster: `assets/report.py` feeds it.
"""

import base64
import html
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
    """One experiment's inputs to the write-up: its settings and every table the assets computed for it."""

    name: str
    description: str
    base_model: str
    hyperparameters: dict
    spec: dict  # boundaries, alpha, preset, verdict_alpha, random_splits, min group sizes
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
    curve_metric: str = "heldout_acc",
) -> Writeup:
    """The whole write-up. `data`: counts of the PRISM data and its pairs (`source`, `synthetic`, `survey`,
    `conversations`, `utterances`, `pairs`, `users_with_pairs`)."""
    doc = Document()
    tables: dict[str, list[pd.DataFrame]] = {"baseline": [], "detail": [], "summary": [], "correspondence": []}
    doc.heading(1, "Do groups that prefer more strongly also differ in how DPO learns from them?")
    doc.paragraph(
        "Within-model preference pairs of PRISM; an ordered logit of the score gap on user covariates; splits of "
        "users from its significant covariates, a null-control split (region) and random splits (the calibrated "
        "null); DPO on each group's pairs over several seeds; does the groups' DPO difference follow the "
        "predicted direction? Every number below comes from the platform's assets; numbers over seeds are the "
        "mean with a 95% interval."
    )
    doc.heading(2, "Data")
    doc.bullets(_data_lines(data))
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
            "each one's mean A − B with its calibrated 95% CI and verdict, whether the direction is stable."
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


def _data_lines(data: dict) -> list[str]:
    lines = [
        f"Source: `{data['source']}`" + (" — **synthetic**, with planted effects" if data.get("synthetic") else ""),
        f"{data['survey']:,} participants, {data['conversations']:,} conversations, "
        f"{data['utterances']:,} scored responses ({data['dropped_rows']:,} rows dropped on loading, by reason in "
        "`raw_prism`'s metadata)",
        f"{data['pairs']:,} within-model preference pairs from {data['users_with_pairs']:,} participants "
        f"(score gap: median {data['median_gap']:.0f}, mean {data['mean_gap']:.1f})",
    ]
    return lines


def _experiment_sections(doc: Document, tables: dict, e: ExperimentResults, curve_metric: str) -> list[str]:
    primary = e.table[e.table["metric"] == correspondence.PRIMARY_METRIC]
    seeds = sorted(e.runs["seed"].unique().tolist()) if len(e.runs) else []
    doc.heading(2, f"Experiment {e.name}")
    if e.description != e.name:
        doc.paragraph(e.description)

    doc.heading(3, "Setup")
    boundaries = ", ".join(f"{b:g}" for b in e.fit["boundaries"])
    doc.bullets(
        [
            f"Split model: ordered logit of the score gap binned at {boundaries} "
            f"({len(e.fit['boundaries']) + 1} outcome levels; clustered by user), on {e.fit['num_pairs']:,} pairs "
            f"of {e.fit['num_users']:,} users; {'converged' if e.fit['converged'] else '**did not converge**'}",
            f"Splits: preset `{e.spec['preset']}`, α {e.spec['alpha']:g} for a covariate; "
            f"{e.spec['random_splits']} random splits; verdicts at Holm-adjusted p < {e.spec['verdict_alpha']:g}",
            f"Model: `{e.base_model}`",
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
    doc.paragraph("DPO on every pair, the runs every split's groups are read against:")
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
        f"Primary metric, {correspondence.METRICS[correspondence.PRIMARY_METRIC]}: each split's mean A − B with "
        "its 95% CI on the calibrated null's scale, its p on the predicted side, Holm-adjusted over the "
        "experiment's predicted splits, the verdict and the power line (README, \"Reading the correspondence "
        'table").'
    )
    doc.table(summary_display(primary))

    doc.heading(3, "Per split")
    doc.paragraph(
        "Each group's mean over seeds and A − B over the seeds both groups have (paired), with 95% t-intervals "
        "over seeds (steps to 60%: over the seeds that reached it). Random splits are in the summary only."
    )
    detailed = e.splits[~e.splits["random"]] if "random" in e.splits else e.splits
    for split in detailed.itertuples():
        detail = split_detail(e.runs, split.split, DETAIL_METRICS).assign(experiment=e.name)
        tables["detail"].append(detail)
        verdict = primary.loc[primary["split"] == split.split, "verdict"]
        doc.heading(4, f"{split.split} (predicted {split.predicted})")
        doc.paragraph(
            f"A: {split.group_a}; B: {split.group_b}. Verdict: **{verdict.iloc[0] if len(verdict) else 'no runs'}**."
        )
        doc.table(detail_display(detail))

    doc.heading(3, "Correspondence check")
    doc.paragraph("The verdict on every metric (mean A − B):")
    check = correspondence_check(e.table)
    tables["correspondence"].append(check.assign(experiment=e.name))
    doc.table(check)
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
            plots.null_plot(e.table, correspondence.METRICS, e.spec["verdict_alpha"]),
            f"{e.name}: each split's z against the random splits'",
        )
    return experiment_observations(e.name, e.table, len(seeds))


def summary_display(primary: pd.DataFrame) -> pd.DataFrame:
    def p(value):
        return "—" if pd.isna(value) else f"{value:.3g}"

    return pd.DataFrame(
        {
            "split": primary["split"],
            "predicted": primary["predicted"],
            "per-seed A−B": primary["per_seed_d"].map(lambda v: ", ".join(f"{x:+.3f}" for x in v)),
            "mean A−B [95% CI]": [
                format_interval(mean, low, high, signed=True) if n else "no runs"
                for mean, low, high, n in primary[["mean_d", "ci_low", "ci_high", "n_seeds"]].values
            ],
            "sign k/n": primary["sign_consistency"],
            "z": primary["z"].map(lambda v: "—" if pd.isna(v) else f"{v:+.2f}"),
            "p (predicted side)": primary["p_predicted"].map(p),
            "p (Holm)": primary["p_adjusted"].map(p),
            "verdict": primary["verdict"],
            "power": [power_line(row) for _, row in primary.iterrows()],
        }
    )


def power_line(row) -> str:
    if pd.isna(row["mde"]):
        return "—"
    line = f"MDE {row['mde']:.3f}" + (f" with {row['planned_seeds']:.0f} seeds" if row["n_seeds"] == 0 else "")
    if pd.isna(row["effect_for_seeds"]) or pd.isna(row["seeds_needed"]):
        return line
    if row["seeds_needed"] == float("inf"):
        needed = f"{row['heldout_needed']:.0f} held-out pairs per group"
        return f"{line}; {row['effect_for_seeds']:.3f}: not reachable by seeds (needs {needed})"
    return f"{line}; {row['effect_for_seeds']:.3f} needs {row['seeds_needed']:.0f} seeds"


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


def correspondence_check(table: pd.DataFrame) -> pd.DataFrame:
    """split × metric: the verdict with the mean A − B, predicted and null-control splits (not the random ones)."""
    shown = table[~table["random"]] if "random" in table else table
    cells = shown.assign(
        cell=[
            f"{verdict} ({mean:+.3f})" if not pd.isna(mean) else str(verdict)
            for verdict, mean in zip(shown["verdict"], shown["mean_d"])
        ]
    )
    wide = cells.pivot(index="split", columns="metric", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(shown["split"])), columns=list(correspondence.METRICS))
    wide.columns = [re.sub(", (primary|the original metric)$", "", correspondence.METRICS[m]) for m in wide.columns]
    return wide.reset_index()


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


def experiment_observations(name: str, table: pd.DataFrame, n_seeds: int) -> list[str]:
    """What the table says, in sentences: the verdicts on the primary metric, the null control, how many metrics
    agree with each MATCH, and which splits need more seeds or larger held-out sets."""
    primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
    predicted = primary[~primary["random"] & ~primary["null_control"]]
    lines = []
    for verdict in (correspondence.MATCH, correspondence.MISMATCH):
        rows = predicted[predicted["verdict"] == verdict]
        if len(rows):
            agree = {
                split: int((table[(table["split"] == split)]["verdict"] == verdict).sum()) for split in rows["split"]
            }
            lines.append(
                f"{name}: **{verdict}** on the primary metric: "
                + "; ".join(
                    f"{r.split} (mean A − B {r.mean_d:+.3f}, Holm p {r.p_adjusted:.3g}; {verdict} on "
                    f"{agree[r.split]} of {len(correspondence.METRICS)} metrics)"
                    for r in rows.itertuples()
                )
            )
    if not (predicted["verdict"].isin([correspondence.MATCH, correspondence.MISMATCH])).any():
        lines.append(f"{name}: no predicted split is MATCH or MISMATCH on the primary metric.")
    for row in primary[primary["null_control"]].itertuples():
        if row.verdict == correspondence.NULL_OK:
            lines.append(
                f"{name}: the null control {row.split} looks like a random split (two-sided p {row.p_two:.3g}): "
                "the null holds."
            )
        else:
            lines.append(
                f"{name}: the null control {row.split} is **{row.verdict}** (two-sided p {row.p_two:.3g}): it "
                "stands out from the random splits, so every other verdict deserves suspicion."
            )
    untrained = predicted[predicted["verdict"] == correspondence.calibration.NOT_TRAINED]
    if len(untrained):
        lines.append(f"{name}: not trained, a group too small: {', '.join(untrained['split'])}.")
    open_splits = predicted[predicted["verdict"] == correspondence.INCONCLUSIVE]
    more_seeds = open_splits[np.isfinite(open_splits["seeds_needed"].astype(float))]
    unreachable = open_splits[np.isinf(open_splits["seeds_needed"].astype(float))]
    if len(more_seeds):
        lines.append(
            f"{name}: INCONCLUSIVE, more seeds would decide (to detect the null's typical |A − B|): "
            + ", ".join(f"{r.split} {r.seeds_needed:.0f} seeds" for r in more_seeds.itertuples())
            + f" (now {n_seeds})."
        )
    if len(unreachable):
        lines.append(
            f"{name}: INCONCLUSIVE and not reachable by seeds — the held-out sets' own sampling error is above the "
            "null's typical |A − B|: "
            + ", ".join(
                f"{r.split} needs {r.heldout_needed:.0f} held-out pairs per group" for r in unreachable.itertuples()
            )
            + "."
        )
    return lines


def _comparison_observations(comparison: pd.DataFrame) -> list[str]:
    if comparison.empty:
        return []
    lines = []
    for (first, second), rows in comparison.groupby(["experiment_1", "experiment_2"], sort=False):
        flips = rows[rows["direction"] == "flip"]
        disagree = rows[~rows["verdicts_agree"].astype(bool)]
        lines.append(
            f"{first} and {second} share {len(rows)} splits: "
            + (
                "every direction is stable"
                if flips.empty
                else "the direction flips on "
                + ", ".join(f"{a}/{b}" for a, b in zip(flips["split_1"], flips["split_2"]))
            )
            + (
                "; the verdicts agree on all."
                if disagree.empty
                else "; the verdicts differ on "
                + ", ".join(f"{r.split_1}/{r.split_2} ({r.verdict_1} / {r.verdict_2})" for r in disagree.itertuples())
                + "."
            )
        )
    return lines
