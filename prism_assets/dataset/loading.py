"""Reading PRISM's three JSON-lines tables into typed DataFrames, from a directory or the Hub.

Owns the one parsing path every source goes through: a line that is no UTF-8 JSON object, or a row that
does not validate against its typed model (`schema.ROW_MODELS`), raises `PrismFormatError` naming the file,
line, field and value; rows the experiment cannot use (users absent from the survey, responses that are not
text, scores that are no integer in 1–100) are dropped and counted by reason in `PrismTables.dropped`; an
input left with no usable rows is an error naming the file and the drops. The Hub source downloads the
same jsonl files with `huggingface_hub` (honouring its cache and `HF_HUB_OFFLINE`) and never falls back.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

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


def _location(loc: tuple) -> str:
    """A pydantic error location as the field's path: conversation_history[3].turn."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def row_problem(error: ValidationError, row: dict) -> str:
    """What is wrong with a row, naming the field, the value and what was expected (the first problem, and how
    many more there are)."""
    first, *others = error.errors()
    where = _location(first["loc"])
    if first["type"] == "missing":
        problem = f"missing required field {where!r}"
    else:
        value = repr(first["input"])
        problem = f"{where}: {first['msg'].removeprefix('Value error, ')} (got {value[:80]})"
    if where.startswith("conversation_history") and isinstance(row.get("conversation_id"), str):
        problem = f"conversation {row['conversation_id']!r}: {problem}"
    return problem + (f"; and {len(others)} more in this row" if others else "")


def read_jsonl(path: Path, model: type[schema.Row]) -> list[dict]:
    """Rows of one jsonl file, each validated against `model`; each row gets `_line` (1-based) for later errors."""
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise PrismFormatError(
                    f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_object_without_duplicate_keys)
            except json.JSONDecodeError as error:
                raise PrismFormatError(
                    f"{path}:{line_number}: malformed JSON: {error.msg} (column {error.colno})"
                ) from None
            except ValueError as error:  # a duplicated key, an integer too long to convert
                raise PrismFormatError(f"{path}:{line_number}: malformed JSON: {error}") from None
            if not isinstance(row, dict):
                raise PrismFormatError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            try:
                model.model_validate(row)
            except ValidationError as error:
                raise PrismFormatError(f"{path}:{line_number}: {row_problem(error, row)}") from None
            row["_line"] = line_number
            rows.append(row)
    return rows


def _object_without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (json would keep the last one silently)."""
    row = dict(pairs)
    if len(row) < len(pairs):  # rare: find the key given twice
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in one object")
            seen.add(key)
    return row


def _repeat(rows: list[dict], key: Callable[[dict], object]) -> tuple[dict, int] | None:
    """The first row whose key an earlier row has, with that earlier row's line; None when every key is unique."""
    seen: dict[object, int] = {}
    for row in rows:
        if key(row) in seen:
            return row, seen[key(row)]
        seen[key(row)] = row["_line"]
    return None


def _check_unique(rows: list[dict], key: str, path: Path) -> None:
    if repeat := _repeat(rows, lambda row: row[key]):
        row, first = repeat
        raise PrismFormatError(f"{path}:{row['_line']}: duplicate {key} {row[key]!r} (first on line {first})")


def _check_interactions(rows: list[dict], path: Path) -> None:
    """An interaction is one user message: its responses share conversation and turn, each its own within_turn_id."""
    first: dict[str, dict] = {}
    for row in rows:
        seen = first.setdefault(row["interaction_id"], row)
        if (seen["conversation_id"], seen["turn"]) != (row["conversation_id"], row["turn"]):
            raise PrismFormatError(
                f"{path}:{row['_line']}: duplicate interaction_id {row['interaction_id']!r}: line {seen['_line']} "
                f"has it in conversation {seen['conversation_id']!r} turn {seen['turn']}, this line in "
                f"conversation {row['conversation_id']!r} turn {row['turn']}"
            )
    numbered = [row for row in rows if row.get("within_turn_id") is not None]
    if repeat := _repeat(numbered, lambda row: (row["interaction_id"], row["within_turn_id"])):
        row, line = repeat
        raise PrismFormatError(
            f"{path}:{row['_line']}: duplicate within_turn_id {row['within_turn_id']} in interaction "
            f"{row['interaction_id']!r} (first on line {line})"
        )


def _as_json_text(value):
    return value if isinstance(value, str) or value is None else json.dumps(value, sort_keys=True)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _one_type_per_column(frame: pd.DataFrame) -> pd.DataFrame:
    """A column whose values are of more than one type (a field outside the codebook, say) becomes JSON text: a
    parquet column has one type."""
    for column in [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c])]:
        kinds = {type(v) for v in frame[column] if not _missing(v)}
        if len(kinds) > 1:
            frame[column] = frame[column].map(_as_json_text)
    return frame


def _score_problem(value) -> str | None:
    """The drop reason of a score the experiment cannot use, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "utterances_score_not_a_number"
    if isinstance(value, float) and not math.isfinite(value):
        return "utterances_score_not_a_number"
    if not schema.MIN_SCORE <= value <= schema.MAX_SCORE or not float(value).is_integer():
        return "utterances_score_outside_1_100"
    return None


def _nothing_left(path: Path, what: str, total: int, dropped: Counter) -> PrismFormatError:
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items())) or "none"
    return PrismFormatError(f"{path}: no usable {what} ({total} rows read; dropped: {reasons})")


def survey_table(rows: list[dict]) -> pd.DataFrame:
    """The survey as a table: nested dicts flattened the authors' way, other nested values as JSON text."""
    frame = pd.DataFrame([{k: _as_json_text(v) for k, v in schema.flatten_survey_row(row).items()} for row in rows])
    for pref in schema.STATED_PREFS:
        frame[f"stated_prefs_{pref}"] = frame[f"stated_prefs_{pref}"].astype(float)
    return _one_type_per_column(frame.drop(columns="_line", errors="ignore"))


def tables_from_rows(
    survey: list[dict], conversations: list[dict], utterances: list[dict], source: str, paths: dict[str, Path]
) -> PrismTables:
    """Check keys across rows, drop-and-count what the experiment cannot use, and type the three tables."""
    _check_unique(survey, "user_id", paths["survey"])
    _check_unique(conversations, "conversation_id", paths["conversations"])
    _check_unique(utterances, "utterance_id", paths["utterances"])
    _check_interactions(utterances, paths["utterances"])
    if not survey:
        raise PrismFormatError(f"{paths['survey']}: no survey rows")
    dropped: Counter[str] = Counter()
    known_users = {row["user_id"] for row in survey}

    kept_conversations = []
    for row in conversations:
        if row["user_id"] not in known_users:
            dropped["conversations_user_not_in_survey"] += 1
        else:
            kept_conversations.append({k: _as_json_text(v) for k, v in row.items()})
    if not kept_conversations:
        raise _nothing_left(paths["conversations"], "conversations", len(conversations), dropped)

    kept_utterances = []
    for row in utterances:
        if row["user_id"] not in known_users:
            reason: str | None = "utterances_user_not_in_survey"
        elif not isinstance(row["model_response"], str):
            reason = "utterances_response_not_text"
        else:
            reason = _score_problem(row["score"])
        if reason:
            dropped[reason] += 1
        else:
            kept_utterances.append(row)  # typed as validated; a field of mixed types becomes text below
    if not kept_utterances:
        raise _nothing_left(paths["utterances"], "utterances", len(utterances), dropped)

    utterance_frame = pd.DataFrame(kept_utterances)
    for name in schema.FIELDS["utterances"]:  # optional fields absent from every row: still a column
        if name not in utterance_frame:
            utterance_frame[name] = None
    utterance_frame["score"] = utterance_frame["score"].astype("int64")
    utterance_frame["turn"] = utterance_frame["turn"].astype("int64")
    return PrismTables(
        survey=survey_table(survey),
        conversations=_one_type_per_column(pd.DataFrame(kept_conversations).drop(columns="_line")),
        utterances=_one_type_per_column(utterance_frame.drop(columns="_line")),
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
    rows = {table: read_jsonl(paths[table], schema.ROW_MODELS[table]) for table in schema.TABLES}
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
