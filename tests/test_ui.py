"""What a researcher sees after the main job: staleness as the instance reports it, and the UI in a browser.

Runs on the instance the small main job leaves behind (conftest `main_job`), through a real
dagster-webserver on 127.0.0.1: GraphQL for "unsynced" (Dagster's staleness) after changing a DPO
hyperparameter or the pair-building code, and headless Chromium (Debian's /usr/bin/chromium driven by
Playwright, no browser download) for the asset graph and the correspondence table. Screenshots go to
test-artifacts/ in the repository.
"""

import os
import shutil
from pathlib import Path

import pytest
from conftest import shipped_asset_keys
from webserver import serve, staleness

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path(os.environ.get("PRISM_CHROMIUM", "/usr/bin/chromium"))
ASSETS = shipped_asset_keys()
RUNS = ["v3/group_dpo_run", "v2/group_dpo_run"]
PARTITION = "S1_age.A|0"  # a cell of both experiments

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(main_job):
    env, _ = main_job
    with serve(REPO, env) as url:
        yield url


def test_after_the_main_job_nothing_is_unsynced(served):
    assert staleness(served, PARTITION) == dict.fromkeys(ASSETS, "FRESH")


def test_a_dpo_hyperparameter_marks_only_the_dpo_runs_and_the_table_unsynced(main_job):
    env, _ = main_job
    with serve(REPO, {**env, "DPO_LEARNING_RATE": "2e-3"}) as url:
        status = staleness(url, PARTITION)
    # the base model's log-probs do not depend on the learning rate: reference_logps stays synced
    stale = [*RUNS, "correspondence_table", "research_report"]
    assert status == {**dict.fromkeys(ASSETS, "FRESH"), **dict.fromkeys(stale, "STALE")}


def test_a_setting_of_one_experiment_marks_only_its_own_assets_unsynced(main_job, tmp_path):
    env, _ = main_job
    edited = tmp_path / "experiments.toml"
    edited.write_text((REPO / "experiments.toml").read_text().replace("alpha = 0.1", "alpha = 0.05"))
    with serve(REPO, {**env, "PRISM_EXPERIMENTS_FILE": str(edited)}) as url:
        status = staleness(url, PARTITION)
    stale = [  # α picks the splits from the fit: the fit itself stays
        "v2/significant_splits",
        "v2/group_dpo_run",
        "correspondence_table",
        "research_report",
    ]
    assert status == {**dict.fromkeys(ASSETS, "FRESH"), **dict.fromkeys(stale, "STALE")}


def test_editing_the_pair_building_code_marks_everything_downstream_unsynced(main_job, tmp_path):
    env, _ = main_job
    code = tmp_path / "code"
    code.mkdir()
    for name in ("prism_assets", "resources"):
        shutil.copytree(REPO / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("workspace.yaml", "experiments.toml"):
        shutil.copy(REPO / name, code / name)
    pairs = code / "prism_assets" / "dataset" / "pairs.py"
    source = pairs.read_text()
    pairs.write_text(source + "\n# a comment and a docstring change nothing\n")
    with serve(code, {**env, "PYTHONPATH": str(code)}) as url:
        assert staleness(url, PARTITION) == dict.fromkeys(ASSETS, "FRESH")
    pairs.write_text(source.replace("def within_model_pairs(", "MIN_TURN = 1\n\n\ndef within_model_pairs(", 1))
    with serve(code, {**env, "PYTHONPATH": str(code)}) as url:
        status = staleness(url, PARTITION)
    assert status == {"raw_prism": "FRESH", **dict.fromkeys(ASSETS[1:], "STALE")}


def _browser(playwright):
    if not CHROMIUM.exists():
        if os.environ.get("PRISM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (make test does, as root)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])


def _expand_all_groups(page, attempts: int = 4):
    """The graph's settings menu → "Expand all groups". The newsletter dialog may show while the menu is open; its
    handler's "Skip" closes the menu too, so the menu is opened again until the click lands."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        page.locator('[aria-label="settings"]').last.click()
        try:
            page.get_by_text("Expand all groups").last.click(timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def test_the_ui_shows_every_asset_and_the_correspondence_table_with_its_plot(served):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 2400, "height": 1000})  # wide: nodes show whole names
        # A fresh instance greets its first visitor with a newsletter dialog: dismiss it whenever it shows.
        page.add_locator_handler(
            page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
        )
        page.goto(f"{served}/asset-groups")
        page.locator('[aria-label="unfold_more"]').first.wait_for(timeout=60_000)  # the graph, its groups folded
        _expand_all_groups(page)
        page.reload()  # the graph fits its view to the unfolded groups (kept in the browser) when it loads
        try:
            for asset in {key.split("/")[-1] for key in ASSETS}:
                expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=30_000)
            for group in ("data", "v3", "v2", "dpo", "report"):
                expect(page.get_by_text(group, exact=True).first).to_be_visible()
            page.wait_for_timeout(1000)  # edges settle
        finally:
            page.screenshot(path=str(ARTIFACTS / "asset-graph.png"))  # an artifact whether or not the checks pass

        page.goto(f"{served}/assets/correspondence_table")
        page.get_by_text("[Show Markdown]").first.click()  # metadata "v3": v3's table
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("held-out accuracy (tail mean), primary", exact=False).first).to_be_visible(
            timeout=30_000
        )
        for text in ("S1_age", "S8_region", "A≈B", "mean A−B [95% CI]", "verdict"):
            expect(dialog.get_by_text(text).first).to_be_visible()
        page.wait_for_timeout(500)  # the dialog's fade-in
        dialog.screenshot(path=str(ARTIFACTS / "correspondence-table.png"))
        dialog.get_by_role("button", name="Close").click()

        page.get_by_text("[Show Markdown]").nth(2).click()  # metadata "learning_curves": the PNG
        image = page.get_by_role("dialog").locator("img[src^='data:image/png']")
        expect(image).to_be_visible(timeout=30_000)
        width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert width > 500 and height > 200  # decoded, not a broken image
        page.wait_for_timeout(500)
        page.get_by_role("dialog").screenshot(path=str(ARTIFACTS / "learning-curves.png"))
        browser.close()
