"""The PNG plots shown in the Dagster UI, and how a PNG goes into materialization metadata.

Owns the figures: the score-gap histogram with the quartile boundaries that define the ordered
logit's outcome, the coefficient plot with 95% confidence intervals, and the learning curves of each
split's two groups (mean and min–max band over seeds). Each returns PNG bytes; `markdown_image` embeds
them in a markdown metadata value, which the UI renders inline.
"""

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

GROUP_COLORS = (("A", "tab:blue"), ("B", "tab:orange"))


def png_bytes(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def score_gap_histogram(score_gap: pd.Series, boundaries: list[float]) -> bytes:
    """Pairs by score gap (1..99), with the boundaries between the ordered logit's four outcome bins."""
    figure, ax = plt.subplots(figsize=(7, 3.2))
    bins = np.arange(0.5, max(100, int(score_gap.max()) + 1) + 0.5, 1)
    ax.hist(score_gap, bins=bins, color="tab:gray")  # type: ignore[arg-type]  # stubs omit arrays, which hist takes
    for k, boundary in enumerate(boundaries, start=1):
        ax.axvline(boundary + 0.5, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(
            f"Y≤{k} | {boundary:g}",
            (boundary + 0.5, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            color="tab:red",
            fontsize=8,
        )
    ax.set_xlabel("score gap (chosen − rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{len(score_gap)} within-model pairs; dashed: quartile boundaries of the outcome Y", fontsize=9)
    return png_bytes(figure)


def coefficient_plot(coefficients: pd.DataFrame) -> bytes:
    """β with its 95% CI per term (positive: larger score gaps); significant terms (p < 0.05) in color."""
    table = coefficients.iloc[::-1]
    figure, ax = plt.subplots(figsize=(9, 0.28 * len(table) + 1.2))
    y = np.arange(len(table))
    significant = (table["p"] < 0.05).to_numpy()
    for flag, color in ((False, "tab:gray"), (True, "tab:blue")):
        rows = table[significant == flag]
        ys = y[significant == flag]
        ax.errorbar(
            rows["beta"],
            ys,
            xerr=[rows["beta"] - rows["ci_low"], rows["ci_high"] - rows["beta"]],
            fmt="o",
            color=color,
            markersize=3,
            capsize=2,
            label="p < 0.05" if flag else "p ≥ 0.05",
        )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, table["term"], fontsize=7)
    ax.set_xlabel("β: log-odds of a larger score gap (95% CI, clustered by user)")
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(figure)


def learning_curve_plot(curves: pd.DataFrame, splits: pd.DataFrame, metric: str) -> bytes:
    names = list(splits["split"])
    columns = min(4, max(1, len(names)))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False, sharey=True)
    for ax, split in zip(axes.flat, splits.itertuples()):
        for group, color in GROUP_COLORS:
            data = curves[(curves["split"] == split.split) & (curves["group"] == group)].dropna(subset=[metric])
            if data.empty:
                continue
            by_step = data.groupby("step")[metric]
            mean = by_step.mean()
            ax.plot(mean.index, mean.values, color=color, label=f"{group} (n={data['seed'].nunique()} seeds)")
            ax.fill_between(mean.index, by_step.min().values, by_step.max().values, color=color, alpha=0.2)
        ax.set_title(f"{split.split}  predicted {split.predicted}", fontsize=9)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # a split without runs yet has nothing to label
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(metric)
    return png_bytes(figure)


def comparison_plot(comparison: pd.DataFrame, metric: str) -> bytes:
    """Each shared split's mean A − B with its 95% CI in both experiments, one row per (pair of experiments, split)."""
    table = comparison.iloc[::-1].reset_index(drop=True)
    figure, ax = plt.subplots(figsize=(8, 0.35 * len(table) + 1.4))
    y = np.arange(len(table))
    for side, offset, color in (("1", 0.15, "tab:blue"), ("2", -0.15, "tab:orange")):
        mean, low, high = (table[f"{c}_{side}"].astype(float) for c in ("mean_d", "ci_low", "ci_high"))
        ax.errorbar(
            mean,
            y + offset,
            xerr=[(mean - low).fillna(0), (high - mean).fillna(0)],
            fmt="o",
            color=color,
            markersize=4,
            capsize=2,
            label=f"experiment {side}",
        )
    ax.axvline(0, color="black", linewidth=0.8)
    labels = [
        f"{r.experiment_1}:{r.split_1} / {r.experiment_2}:{r.split_2}" + ("  FLIP" if r.direction == "flip" else "")
        for r in table.itertuples()
    ]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel(f"mean A − B of {metric} over seeds (95% CI)")
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(figure)


VERDICT_COLORS = {"MATCH": "tab:green", "MISMATCH": "tab:red", "null OK": "tab:blue", "null NOT OK": "tab:purple"}


def null_plot(table: pd.DataFrame, label: str, alpha: float) -> bytes:
    """Each split's z on the primary metric against the null: the random splits' z (gray dots) and the null's Student
    t density (K df), with its two-sided α band; a split is colored by its verdict."""
    from scipy import stats

    figure, ax = plt.subplots(figsize=(9, 2.1))
    rows = table[table["z"].notna()]
    random = rows[rows["random"]]
    ax.scatter(random["z"], np.zeros(len(random)), color="tab:gray", s=18, label="random splits")
    for row in rows[~rows["random"]].itertuples():
        color = VERDICT_COLORS.get(row.verdict, "black")
        ax.scatter([row.z], [0.0], color=color, s=30, marker="D")
        ax.annotate(row.split, (row.z, 0.0), xytext=(0, 6), textcoords="offset points", fontsize=6, rotation=45)
    if len(rows):
        df = int(rows["null_df"].iloc[0])
        null = stats.t(df) if df >= 2 else stats.norm()
        reach = max(4.0, float(rows["z"].abs().max()) + 0.5)
        grid = np.linspace(-reach, reach, 200)
        ax.plot(grid, null.pdf(grid), color="tab:gray", linewidth=0.8)
        for x in (-null.ppf(1 - alpha / 2), null.ppf(1 - alpha / 2)):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks([])
    ax.set_title(label, loc="left", fontsize=8)
    ax.set_xlabel(f"z = t / σ₀ against the null's t (dashed: two-sided α = {alpha:g} before Holm)")
    return png_bytes(figure)
