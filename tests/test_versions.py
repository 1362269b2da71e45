"""Code versions from source."""

import pytest

from prism_assets import versions
from prism_assets.assets import dpo


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


def test_code_versions_follow_the_logic_modules_imports(tmp_path, monkeypatch):
    # The trainer's own imports decide what a DPO run's code version covers: nobody lists the step's modules.
    covered = versions.code_modules(dpo, "prism_assets.training.trainer")
    assert {
        "prism_assets.training.engine",
        "prism_assets.training.logps",
        "prism_assets.training.packing",
        "prism_assets.training.metrics",
    } <= set(covered)
    assert "prism_assets.dataset.pairs" not in covered and "prism_assets.versions" not in covered
    # an edit to a module reached only through imports changes the version
    package = tmp_path / "prism_assets" / "training"
    package.mkdir(parents=True)
    (package / "entry.py").write_text("from prism_assets.training.helper import f\n")
    (package / "helper.py").write_text("def f():\n    return 1\n")
    monkeypatch.setattr(versions, "_module_file", lambda name: tmp_path.joinpath(*name.split(".")).with_suffix(".py"))
    monkeypatch.setattr(versions, "_source", lambda name: (name, versions._module_file(name).read_text()))
    before = versions.source_version("prism_assets.training.entry")
    (package / "helper.py").write_text("def f():\n    return 2\n")
    assert versions.source_version("prism_assets.training.entry") != before
