"""Reading PRISM's three JSON-lines tables into typed DataFrames, from a directory or the Hub.

Owns the one parsing path every source goes through: a malformed line or a row without a required
field raises `PrismFormatError` naming the file, line and field; rows the experiment cannot use
(utterances or conversations of users absent from the survey, scores outside 1–100) are dropped and
counted by reason in `PrismTables.dropped`. The Hub source downloads the same jsonl files with
`huggingface_hub` (honouring its cache and `HF_HUB_OFFLINE`) and never falls back to another source.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from prism_assets.dataset import schema


class PrismFormatError(ValueError):
    """A PRISM file that cannot be read as the codebook describes it."""


@dataclass
class PrismTables:
    survey: pd.DataFrame
    conversations: pd.DataFrame
    utterances: pd.DataFrame
    source: str
    dropped: dict[str, int] = field(default_factory=dict)


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of one jsonl file; each row gets `_line` (1-based) for later error messages."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PrismFormatError(
                    f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise PrismFormatError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for name in required:
                if name not in row:
                    raise PrismFormatError(f"{path}:{line_number}: missing required field {name!r}")
            row["_line"] = line_number
            rows.append(row)
    return rows


def _check_unique(rows: list[dict], key: str, path: Path) -> None:
    seen: dict[object, int] = {}
    for row in rows:
        if row[key] in seen:
            raise PrismFormatError(
                f"{path}:{row['_line']}: duplicate {key} {row[key]!r} (first on line {seen[row[key]]})"
            )
        seen[row[key]] = row["_line"]


def _as_json_text(value):
    return value if isinstance(value, str) or value is None else json.dumps(value, sort_keys=True)


def _valid_score(value) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value).is_integer()
        and schema.MIN_SCORE <= value <= schema.MAX_SCORE
    )


def _valid_turn(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tables_from_rows(
    survey: list[dict], conversations: list[dict], utterances: list[dict], source: str, paths: dict[str, Path]
) -> PrismTables:
    """Validate, drop-and-count, and type the three tables' rows."""
    _check_unique(survey, "user_id", paths["survey"])
    _check_unique(conversations, "conversation_id", paths["conversations"])
    _check_unique(utterances, "utterance_id", paths["utterances"])
    dropped: Counter[str] = Counter()
    known_users = {row["user_id"] for row in survey}

    kept_conversations = []
    for row in conversations:
        if row["user_id"] not in known_users:
            dropped["conversations_user_not_in_survey"] += 1
            continue
        if not isinstance(row["conversation_history"], list):
            raise PrismFormatError(
                f"{paths['conversations']}:{row['_line']}: conversation_history must be a list, "
                f"got {type(row['conversation_history']).__name__}"
            )
        kept_conversations.append({k: _as_json_text(v) for k, v in row.items()})

    kept_utterances = []
    for row in utterances:
        if not _valid_turn(row["turn"]):
            raise PrismFormatError(
                f"{paths['utterances']}:{row['_line']}: turn must be an integer ≥ 0 (0-based), got {row['turn']!r}"
            )
        if row["user_id"] not in known_users:
            dropped["utterances_user_not_in_survey"] += 1
        elif not _valid_score(row["score"]):
            dropped["utterances_score_outside_1_100"] += 1
        else:
            kept_utterances.append(row)

    survey_frame = pd.DataFrame(
        [{k: _as_json_text(v) for k, v in schema.flatten_survey_row(row).items()} for row in survey]
    )
    for pref in schema.STATED_PREFS:
        column = f"stated_prefs_{pref}"
        if column in survey_frame:
            survey_frame[column] = pd.to_numeric(survey_frame[column], errors="coerce")
    utterance_frame = pd.DataFrame(kept_utterances)
    if len(utterance_frame):
        utterance_frame["score"] = utterance_frame["score"].astype("int64")
        utterance_frame["turn"] = utterance_frame["turn"].astype("int64")
        utterance_frame["model_response"] = utterance_frame["model_response"].astype(str)
    return PrismTables(
        survey=survey_frame.drop(columns="_line"),
        conversations=pd.DataFrame(kept_conversations).drop(columns="_line", errors="ignore"),
        utterances=utterance_frame.drop(columns="_line", errors="ignore"),
        source=source,
        dropped=dict(sorted(dropped.items())),
    )


def load_prism_directory(directory: str | Path, source: str | None = None) -> PrismTables:
    """PRISM from a directory holding survey.jsonl, conversations.jsonl and utterances.jsonl."""
    directory = Path(directory)
    paths = {table: directory / name for table, name in schema.JSONL_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"PRISM directory {directory} lacks {', '.join(missing)}")
    rows = {table: read_jsonl(paths[table], schema.REQUIRED_FIELDS[table]) for table in schema.TABLES}
    return tables_from_rows(
        rows["survey"],
        rows["conversations"],
        rows["utterances"],
        source=source or f"local directory {directory}",
        paths=paths,
    )


def load_prism_hub(dataset_id: str = schema.HUB_DATASET_ID, revision: str | None = None) -> PrismTables:
    """PRISM from the Hugging Face Hub (or its local cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download

    files = {
        table: Path(hf_hub_download(dataset_id, name, repo_type="dataset", revision=revision))
        for table, name in schema.JSONL_FILES.items()
    }
    directories = {path.parent for path in files.values()}
    if len(directories) != 1:
        raise PrismFormatError(
            f"Hub files of {dataset_id} resolved to different snapshots: {sorted(map(str, directories))}"
        )
    return load_prism_directory(directories.pop(), source=f"hub {dataset_id}@{revision or 'main'}")
