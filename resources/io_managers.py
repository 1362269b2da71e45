"""Asset storage: DataFrames as parquet, everything else as JSON, one directory per asset (and partition).

Owns the on-disk layout of asset outputs under `base_dir`:
`<asset key>/[<one folder per partition dimension>/]` holding `value.parquet` for a DataFrame output, or, for
a dict output, one `<name>.parquet` per DataFrame value and `values.json` for the rest (and the names of those
parquet files). A directory is written next to its final place and renamed into it, so a reader never sees half an
output; one damaged since (a file cut short or deleted) is an error naming the file. Partitioned inputs
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
TABLES_KEY = "__tables__"  # in values.json: the bundle's parquet files, so that one deleted is noticed


class StoredOutputError(RuntimeError):
    """A stored output that cannot be read back whole: the error names the file."""


def write_bundle(directory: Path, obj) -> None:
    """Atomically replace `directory` with the stored form of `obj` (a DataFrame or a dict)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    if isinstance(obj, pd.DataFrame):
        obj.to_parquet(staging / TABLE_FILE, index=False)
    elif isinstance(obj, dict) and TABLES_KEY not in obj:
        values: dict = {TABLES_KEY: []}
        for name, value in obj.items():
            if isinstance(value, pd.DataFrame):
                value.to_parquet(staging / f"{name}.parquet", index=False)
                values[TABLES_KEY].append(name)
            else:
                values[name] = value
        (staging / VALUES_FILE).write_text(json.dumps(values, indent=1, default=str))
    else:
        shutil.rmtree(staging)
        raise TypeError(
            f"cannot store {type(obj).__name__} at {directory}: expected a DataFrame or a dict (without {TABLES_KEY})"
        )
    if directory.exists():
        retired = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
        directory.rename(retired)
        staging.rename(directory)
        shutil.rmtree(retired)
    else:
        staging.rename(directory)


def read_bundle(directory: Path):
    """The stored output in `directory`; one that is damaged raises StoredOutputError naming the file."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no stored output at {directory}")
    if (directory / TABLE_FILE).exists():
        return _read_table(directory / TABLE_FILE)
    values = directory / VALUES_FILE
    if not values.exists():
        raise _damaged(values, f"missing, and so is {TABLE_FILE}: the directory holds no whole output")
    try:
        bundle = json.loads(values.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # cut short, or not text
        raise _damaged(values, f"cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(bundle, dict):
        raise _damaged(values, f"holds a {type(bundle).__name__}, not an object")
    if TABLES_KEY in bundle:
        tables = bundle.pop(TABLES_KEY)
    else:  # written before a bundle named its tables: those that are there
        tables = sorted(path.stem for path in directory.glob("*.parquet"))
    for name in tables:
        path = directory / f"{name}.parquet"
        if not path.exists():
            raise _damaged(path, f"missing ({VALUES_FILE} lists it)")
        bundle[name] = _read_table(path)
    return bundle


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow's errors for a cut or overwritten file are of several kinds
        raise _damaged(path, f"cannot be read ({type(error).__name__}: {error})") from None


def _damaged(path: Path, problem: str) -> StoredOutputError:
    return StoredOutputError(f"{path}: {problem}; this stored output is damaged: materialize it again")


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
