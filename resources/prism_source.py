"""Where raw_prism reads PRISM (`PrismSource`): synthetic, a local directory, or the Hub — one setting, never a silent
fallback."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from prism_assets.dataset import loading, schema, synthetic

SYNTHETIC, HUB = "synthetic", "hf"


class PrismSource(dg.ConfigurableResource):
    """Where raw_prism reads PRISM: "synthetic" (default), "hf" (the Hub), or a directory of jsonl files."""

    source: str = SYNTHETIC
    synthetic_seed: int = Field(default=0, ge=0)
    synthetic_users: int = Field(default=1500, ge=1)
    synthetic_effects: str = Field(
        default="planted", description="'planted' (gap effects, a DPO taste by age) or 'none'"
    )
    synthetic_dir: str = "storage/synthetic_prism"
    hub_dataset_id: str = schema.HUB_DATASET_ID
    hub_revision: str | None = None

    def load(self) -> tuple[loading.PrismTables, dict]:
        """The tables and metadata naming the source (and, for synthetic data, the planted truth's file)."""
        if self.source == SYNTHETIC:
            config = synthetic.SyntheticConfig.of(self.synthetic_seed, self.synthetic_users, self.synthetic_effects)
            effects = "" if self.synthetic_effects == "planted" else f"_effects-{self.synthetic_effects}"
            directory = Path(self.synthetic_dir) / f"seed{self.synthetic_seed}_users{self.synthetic_users}{effects}"
            synthetic.write_synthetic_prism(directory, config)
            described = "" if self.synthetic_effects == "planted" else f", effects {self.synthetic_effects}"
            tables = loading.load_prism_directory(
                directory, source=f"synthetic (seed {self.synthetic_seed}, {self.synthetic_users} users{described})"
            )
            return tables, {
                "synthetic": True,
                "synthetic_note": synthetic.SYNTHETIC_NOTE,
                "planted_truth": dg.MetadataValue.path(str(directory / "truth.json")),
            }
        if self.source == HUB:
            return loading.load_prism_hub(self.hub_dataset_id, self.hub_revision), {"synthetic": False}
        directory = Path(self.source)
        if not directory.is_dir():
            raise ValueError(
                f"PRISM source {self.source!r} is neither 'synthetic', 'hf' nor an existing directory of PRISM "
                "jsonl files"
            )
        return loading.load_prism_directory(directory), {"synthetic": False}
