"""Code versions from source, and environment settings for the resources."""

import pytest

from prism_assets import dpo, versions
from prism_assets.definitions import settings_from_env


def test_source_version_ignores_comments_layout_and_docstrings_but_not_code(tmp_path, monkeypatch):
    def version(source):
        (tmp_path / "edited.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        return versions.source_version("edited")

    base = version('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    assert version('"""Other doc."""\n# comment\ndef f(x):  # here too\n\n    return (x +\n            1)\n') == base
    assert version('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 2\n') != base
    with pytest.raises(ValueError, match="no Python source"):
        versions.source_version("sys")


def test_settings_from_env_converts_types_and_names_unknown_variables(monkeypatch):
    monkeypatch.setenv("DPO_LEARNING_RATE", "2e-5")
    monkeypatch.setenv("DPO_BALANCE_GROUPS", "true")
    monkeypatch.setenv("DPO_RECIPE", "original")  # not a setting: ignored when listed
    assert settings_from_env("DPO_", dpo.DpoSettings, ignore=("DPO_RECIPE",)) == {
        "learning_rate": 2e-5, "balance_groups": True}
    monkeypatch.setenv("DPO_LERNING_RATE", "1")
    with pytest.raises(ValueError, match="DPO_LERNING_RATE: DpoSettings has no setting 'lerning_rate'"):
        settings_from_env("DPO_", dpo.DpoSettings, ignore=("DPO_RECIPE",))
    monkeypatch.delenv("DPO_LERNING_RATE")
    monkeypatch.setenv("DPO_MAX_STEPS", "many")
    with pytest.raises(ValueError, match="DPO_MAX_STEPS='many'"):
        settings_from_env("DPO_", dpo.DpoSettings, ignore=("DPO_RECIPE",))
