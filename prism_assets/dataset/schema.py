"""The PRISM alignment dataset's schema, as its codebook states it.

Owns the typed rows of the three tables (`ROW_MODELS`: each field's type and constraint, which are required),
the answer levels
of the survey's categorical questions (in the codebook's order), and how nested survey dicts are
flattened the authors' way (`location` → `location_special_region`, …). Everything that reads or
writes PRISM rows (the loader, the synthetic generator, the tests) takes these names from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

HUB_DATASET_ID = "HannahRoseKirk/prism-alignment"
TABLES = ("survey", "conversations", "utterances")
JSONL_FILES = {table: f"{table}.jsonl" for table in TABLES}

# PRISM stores an empty model response as this literal string (codebook, utterances.model_response).
EMPTY_RESPONSE = "EMPTY STRING"
MIN_SCORE, MAX_SCORE = 1, 100

# One declaration of each row's fields, their types and constraints (strict: "yes" is no boolean, "1" no
# integer). A row that does not validate is an error naming file, line, field, value and what was expected;
# fields outside the codebook are kept, as text. `score` and `model_response` are checked by the loader instead:
# a value the experiment cannot use there is a counted drop (`loading.tables_from_rows`), not an error.
Id = Annotated[str, StringConstraints(min_length=1)]
Count = Annotated[int, Field(ge=0, lt=2**31)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Preference = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Row(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StatedPrefs(Row):
    """`stated_prefs`: how much the participant says each attribute matters, 0–100."""

    values: Preference
    creativity: Preference
    fluency: Preference
    factuality: Preference
    diversity: Preference
    safety: Preference
    personalisation: Preference
    helpfulness: Preference
    other: Preference | None = None
    other_text: str | None = None


class Location(Row):
    special_region: str
    birth_country: str | None = None
    birth_countryISO: str | None = None
    birth_subregion: str | None = None
    reside_country: str | None = None
    reside_countryISO: str | None = None
    reside_subregion: str | None = None
    same_birth_reside_country: str | None = None


class SurveyRow(Row):
    user_id: Id
    age: str
    gender: str
    education: str
    lm_familiarity: str
    stated_prefs: StatedPrefs
    location: Location
    survey_only: bool | None = None
    num_completed_conversations: Count | None = None
    consent: str | None = None
    consent_age: str | None = None
    lm_direct_use: str | None = None
    lm_indirect_use: str | None = None
    lm_frequency_use: str | None = None
    lm_usecases: dict | None = None
    order_lm_usecases: dict | None = None
    order_stated_prefs: dict | None = None
    self_description: str | None = None
    system_string: str | None = None
    employment_status: str | None = None
    marital_status: str | None = None
    english_proficiency: str | None = None
    religion: dict | None = None
    ethnicity: dict | None = None
    study_id: str | None = None
    study_locale: str | None = None
    generated_datetime: str | None = None
    timing_duration_s: Seconds | None = None
    timing_duration_mins: Seconds | None = None
    included_in_UK_REP: bool | None = None
    included_in_US_REP: bool | None = None
    included_in_balanced_subset: bool | None = None


class HistoryItem(Row):
    """One item of `conversation_history`: a user message, or a model response with its score."""

    turn: Count
    role: Literal["user", "model"]
    content: str
    if_chosen: bool | None = None
    model_name: str | None = None
    within_turn_id: Count | None = None


class ConversationRow(Row):
    conversation_id: Id
    user_id: Id
    conversation_history: list[HistoryItem]
    conversation_type: str | None = None
    opening_prompt: str | None = None
    conversation_turns: Count | None = None
    performance_attributes: dict | None = None
    choice_attributes: dict | None = None
    open_feedback: str | None = None
    generated_datetime: str | None = None
    timing_duration_s: Seconds | None = None
    timing_duration_mins: Seconds | None = None
    included_in_balanced_subset: bool | None = None


class UtteranceRow(Row):
    user_id: Id
    conversation_id: Id
    interaction_id: Id
    utterance_id: Id
    turn: Count
    model_name: Id
    model_response: Any
    score: Any
    within_turn_id: Count | None = None
    conversation_type: str | None = None
    model_provider: str | None = None
    user_prompt: str | None = None
    if_chosen: bool | None = None
    included_in_balanced_subset: bool | None = None


ROW_MODELS: dict[str, type[Row]] = {"survey": SurveyRow, "conversations": ConversationRow, "utterances": UtteranceRow}
FIELDS = {table: tuple(model.model_fields) for table, model in ROW_MODELS.items()}
REQUIRED_FIELDS = {
    table: tuple(name for name, field in model.model_fields.items() if field.is_required())
    for table, model in ROW_MODELS.items()
}

# Survey dicts flattened into `<field>_<key>` columns; the others are stored as JSON text.
FLATTENED_SURVEY_DICTS = ("stated_prefs", "location", "religion", "ethnicity")

STATED_PREFS = (
    "values",
    "creativity",
    "fluency",
    "factuality",
    "diversity",
    "safety",
    "personalisation",
    "helpfulness",
)
LM_USECASES = (
    "homework_assistance",
    "source_suggestions",
    "lifestyle_and_hobbies",
    "travel_guidance",
    "professional_work",
    "historical_or_news_inquiries",
    "casual_conversation",
    "creative_writing",
    "technical_or_programming_help",
    "well_being_guidance",
    "medical_guidance",
    "financial_guidance",
    "legal_guidance",
    "emotional_support",
    "companionship",
    "personal_recommendations",
    "research_overviews",
    "language_learning",
    "other",
)

PREFER_NOT_TO_SAY = "Prefer not to say"
AGE_LEVELS = (
    "18-24 years old",
    "25-34 years old",
    "35-44 years old",
    "45-54 years old",
    "55-64 years old",
    "65+ years old",
    PREFER_NOT_TO_SAY,
)
GENDER_LEVELS = ("Male", "Female", "Non-binary / third gender", PREFER_NOT_TO_SAY)
EDUCATION_LEVELS = (
    "Some Primary",
    "Completed Primary School",
    "Some Secondary",
    "Completed Secondary School",
    "Vocational",
    "Some University but no degree",
    "University Bachelors Degree",
    "Graduate / Professional degree",
    PREFER_NOT_TO_SAY,
)
LM_FAMILIARITY_LEVELS = ("Not familiar at all", "Somewhat familiar", "Very familiar")
SPECIAL_REGIONS = (
    "US",
    "Europe",
    "UK",
    "Latin America and the Caribbean",
    "Australia and New Zealand",
    "Africa",
    "Asia",
    "Northern America",
    "Middle East",
    PREFER_NOT_TO_SAY,
    "Oceania",
)
CONVERSATION_TYPES = ("unguided", "values guided", "controversy guided")


def flatten_survey_row(row: dict) -> dict:
    """One survey row with its nested dicts flattened as the authors do (`location_special_region`)."""
    flat = {}
    for key, value in row.items():
        if key in FLATTENED_SURVEY_DICTS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                flat[f"{key}_{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat
