"""Asset storage: DataFrames as parquet, everything else as JSON, one directory per asset (and partition).

Owns the on-disk layout of asset outputs under `base_dir`:
`<asset key>/[<one folder per partition dimension>/]` holding `value.parquet` for a DataFrame output, or, for
a dict output, one `<name>.parquet` per DataFrame value and `values.json` for the rest. A directory is written next
to its final place and renamed into it, so a reader never sees half an output. Partitioned inputs
downstream of a partitioned asset arrive as {partition key: value}, as Dagster's own IO managers do.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd

TABLE_FILE = "value.parquet"
VALUES_FILE = "values.json"


def write_bundle(directory: Path, obj) -> None:
    """Atomically replace `directory` with the stored form of `obj` (a DataFrame or a dict)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    if isinstance(obj, pd.DataFrame):
        obj.to_parquet(staging / TABLE_FILE, index=False)
    elif isinstance(obj, dict):
        values = {}
        for name, value in obj.items():
            if isinstance(value, pd.DataFrame):
                value.to_parquet(staging / f"{name}.parquet", index=False)
            else:
                values[name] = value
        (staging / VALUES_FILE).write_text(json.dumps(values, indent=1, default=str))
    else:
        shutil.rmtree(staging)
        raise TypeError(f"cannot store {type(obj).__name__} at {directory}: expected a DataFrame or a dict")
    if directory.exists():
        retired = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired)
    else:
        staging.rename(directory)


def read_bundle(directory: Path):
    if not directory.is_dir():
        raise FileNotFoundError(f"no stored output at {directory}")
    if (directory / TABLE_FILE).exists():
        return pd.read_parquet(directory / TABLE_FILE)
    bundle = json.loads((directory / VALUES_FILE).read_text()) if (directory / VALUES_FILE).exists() else {}
    for path in sorted(directory.glob("*.parquet")):
        bundle[path.stem] = pd.read_parquet(path)
    return bundle


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores asset outputs under base_dir as parquet (tables) and JSON (everything else)."""

    base_dir: str

    def _directory(self, asset_key: dg.AssetKey, partition_key: str | None) -> Path:
        path = Path(self.base_dir).joinpath(*asset_key.path)
        return path.joinpath(*partition_key.split("|")) if partition_key is not None else path

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        partition = context.partition_key if context.has_asset_partitions else None
        directory = self._directory(context.asset_key, partition)
        write_bundle(directory, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(directory))})

    def load_input(self, context: dg.InputContext):
        asset_key = context.asset_key
        if not context.has_asset_partitions:
            return read_bundle(self._directory(asset_key, None))
        allow_missing = (context.definition_metadata or {}).get("allow_missing_partitions", False)
        loaded = {}
        for key in context.asset_partition_keys:
            directory = self._directory(asset_key, key)
            if not directory.is_dir() and allow_missing:
                continue
            loaded[key] = read_bundle(directory)
        return loaded
