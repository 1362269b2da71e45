"""The PRISM alignment dataset's schema, as its codebook states it.

Owns the names of the three tables' fields, which of them the platform requires, the answer levels
of the survey's categorical questions (in the codebook's order), and how nested survey dicts are
flattened the authors' way (`location` → `location_special_region`, …). Everything that reads or
writes PRISM rows (the loader, the synthetic generator, the tests) takes these names from here.
"""

from __future__ import annotations

HUB_DATASET_ID = "HannahRoseKirk/prism-alignment"
TABLES = ("survey", "conversations", "utterances")
JSONL_FILES = {table: f"{table}.jsonl" for table in TABLES}

# PRISM stores an empty model response as this literal string (codebook, utterances.model_response).
EMPTY_RESPONSE = "EMPTY STRING"
MIN_SCORE, MAX_SCORE = 1, 100

SURVEY_FIELDS = (
    "user_id",
    "survey_only",
    "num_completed_conversations",
    "consent",
    "consent_age",
    "lm_familiarity",
    "lm_direct_use",
    "lm_indirect_use",
    "lm_frequency_use",
    "lm_usecases",
    "order_lm_usecases",
    "stated_prefs",
    "order_stated_prefs",
    "self_description",
    "system_string",
    "age",
    "gender",
    "employment_status",
    "education",
    "marital_status",
    "english_proficiency",
    "religion",
    "ethnicity",
    "location",
    "study_id",
    "study_locale",
    "generated_datetime",
    "timing_duration_s",
    "timing_duration_mins",
    "included_in_UK_REP",
    "included_in_US_REP",
    "included_in_balanced_subset",
)
CONVERSATION_FIELDS = (
    "conversation_id",
    "user_id",
    "conversation_type",
    "opening_prompt",
    "conversation_turns",
    "conversation_history",
    "performance_attributes",
    "choice_attributes",
    "open_feedback",
    "generated_datetime",
    "timing_duration_s",
    "timing_duration_mins",
    "included_in_balanced_subset",
)
UTTERANCE_FIELDS = (
    "user_id",
    "conversation_id",
    "interaction_id",
    "utterance_id",
    "within_turn_id",
    "conversation_type",
    "turn",
    "model_name",
    "model_provider",
    "user_prompt",
    "model_response",
    "score",
    "if_chosen",
    "included_in_balanced_subset",
)
FIELDS = {"survey": SURVEY_FIELDS, "conversations": CONVERSATION_FIELDS, "utterances": UTTERANCE_FIELDS}

# Fields without which the platform cannot work; a row lacking one is an error, not a drop.
REQUIRED_FIELDS = {
    "survey": ("user_id", "age", "gender", "education", "lm_familiarity", "stated_prefs", "location"),
    "conversations": ("conversation_id", "user_id", "conversation_history"),
    "utterances": (
        "user_id",
        "conversation_id",
        "interaction_id",
        "utterance_id",
        "turn",
        "model_name",
        "model_response",
        "score",
    ),
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
