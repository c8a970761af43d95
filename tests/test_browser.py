"""The two UIs as a user sees them: headless Chromium (Debian's chromium + chromedriver)
against `tuneline ui`, after a scheduled run of the tiny pipeline. Screenshots are saved to
test-artifacts/screenshots/ (TUNELINE_SCREENSHOTS overrides); the README's come from here."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)
SHOTS = Path(
    os.environ.get("TUNELINE_SCREENSHOTS", Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots")
)
STAGES = ["prepare", "tokenize", "train", "validate", "evaluate", "register"]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.fail(
            "Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver "
            "(.ci/run installs them)"
        )
    driver = chromium()
    yield driver
    driver.quit()


def chromium():
    """Headless Chromium driven by chromedriver (docs/screenshots.py uses it too)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # No sandbox as root; no background networking: the machine's closed network refuses it.
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,950",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    SHOTS.mkdir(parents=True, exist_ok=True)
    return driver


def _text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _until(driver, what: str, cond, timeout: float = 90):
    """Wait for the page (a single-page app) to show what a user looks for."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = cond()
            if found:
                return found
        except Exception:  # the element is being re-rendered
            pass
        time.sleep(0.5)
    raise AssertionError(f"the page never showed {what}; it showed:\n{_text(driver)[:2000]}")


def _shows(driver, *texts: str, timeout: float = 90) -> str:
    return _until(
        driver, " and ".join(map(repr, texts)), lambda: all(t in (b := _text(driver)) for t in texts) and b, timeout
    )


def _click_text(driver, text: str):
    from selenium.webdriver.common.by import By

    # The innermost element whose whole text is `text` (tabs wrap their label in spans).
    xpath = f"//*[normalize-space(.)='{text}' and not(.//*[normalize-space(.)='{text}'])]"
    element = _until(
        driver, repr(text), lambda: [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
    )[0]
    element.click()
    return element


def _shot(driver, name: str) -> None:
    time.sleep(1.5)  # let charts finish their animation
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000  # a rendered page, not a blank one


def _mlflow_runs(served) -> dict:
    out = served.proj.python(
        "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "exp = mlflow.get_experiment_by_name('tuneline')\n"
        "runs = mlflow.search_runs([exp.experiment_id], output_format='list')\n"
        "print(json.dumps({'exp': exp.experiment_id, 'runs': {r.info.run_name: r.info.run_id for r in runs}}))"
    )
    return json.loads(out.strip().splitlines()[-1])


def _training_view(driver) -> None:
    """MLflow 3 opens in its GenAI mode; a user switches to 'Model training' once and closes
    the assistant panel (both are remembered by the browser)."""
    from selenium.webdriver.common.by import By

    _click_text(driver, "Model training")
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def test_mlflow_shows_the_runs_the_loss_chart_the_predictions_and_the_champion(served, browser):
    d, ids = browser, _mlflow_runs(served)
    base = f"{served.mlflow}/#/experiments/{ids['exp']}"
    pipeline_run = next(name for name in ids["runs"] if name.startswith("pipeline-"))

    d.get(f"{base}/runs")
    _training_view(d)
    _shows(d, "tuneline", "Runs", pipeline_run)
    _shot(d, "mlflow-runs")

    from selenium.webdriver.common.by import By

    d.get(f"{base}/runs/{ids['runs']['train']}/model-metrics")
    # Charts below the fold are not rendered: search for the loss charts, as a user would.
    _until(
        d, "the chart search box", lambda: d.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric']")
    ).send_keys("loss")
    _shows(d, "train_loss", "val_loss", "Step")

    assert _until(d, "a drawn chart", lambda: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot, svg.main-svg"))
    _shot(d, "mlflow-metric-charts")

    d.get(f"{base}/runs/{ids['runs']['evaluate']}/artifacts/predictions.json")
    _shows(d, "predictions.json", "prompt", "target", "base_output", "tuned_output")
    _shot(d, "mlflow-predictions-table")

    d.get(f"{base}/runs/{ids['runs']['evaluate']}/artifacts")
    _click_text(d, "base_vs_tuned.png")
    assert _until(
        d,
        "the base-vs-tuned plot",
        lambda: d.execute_script("return [...document.images].some(i => i.complete && i.naturalWidth > 300)"),
    )
    _shot(d, "mlflow-base-vs-tuned")

    d.get(f"{served.mlflow}/#/models/descrambler")
    _shows(d, "descrambler", "Version 1", "champion")
    _shot(d, "mlflow-registered-model")


def test_mlflow_shows_what_a_challenger_fixed_and_broke(served, browser, tmp_path):
    """A teammate trains from a copy of the project against the same tracking server; register
    gates the new version against champion v1 and logs the review, which a reviewer opens in
    the MLflow UI (the run's artifacts, review/diff.html) without a terminal."""
    import sys

    copy = tmp_path / "teammate"
    shutil.copytree(served.root, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", ".prefect"))
    served.run(
        sys.executable, "-m", "tuneline.cli", "run", "--set", "train.lr=0.001",
        cwd=copy, PYTHONPATH=str(copy), MLFLOW_TRACKING_URI=served.mlflow,
    )  # fmt: skip
    out = served.proj.python(
        "import json, mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db')\n"
        "v = c.get_model_version('descrambler', '2')\n"
        "print(json.dumps([v.run_id, c.get_experiment(c.get_run(v.run_id).info.experiment_id).experiment_id]))"
    )
    run_id, exp = json.loads(out.strip().splitlines()[-1])
    d = browser
    d.get(f"{served.mlflow}/#/experiments/{exp}/runs/{run_id}/artifacts/review/diff.html")
    _training_view(d)
    from selenium.webdriver.common.by import By

    frame = _until(d, "the report's frame", lambda: d.find_elements(By.TAG_NAME, "iframe"))[0]
    d.switch_to.frame(frame)
    try:
        _shows(d, "v2", "against", "v1", "Fixed (", "Broken (", "By slice", "What changed", "train.lr")
    finally:
        d.switch_to.default_content()
    _shows(d, "diff.html", "diff.md")
    _shot(d, "mlflow-review")


def test_prefect_shows_the_flow_run_and_every_stage_completed(served, browser):
    d = browser
    d.get(f"{served.prefect}/runs/flow-run/{served.first_id}")
    _shows(d, served.first["name"], "Completed", "tuneline-pipeline", "served", *STAGES)
    _shot(d, "prefect-flow-run")
    tab = _click_text(d, "Task Runs")
    text = _shows(d, *STAGES)
    d.execute_script("arguments[0].scrollIntoView({block: 'start'})", tab)  # the list, in the screenshot
    assert text.count("Completed") >= len(STAGES) + 1, text[:3000]  # the flow run and each stage
    _shot(d, "prefect-task-runs")

    d.get(f"{served.prefect}/runs")
    _shows(d, "tuneline-pipeline", served.first["name"], "Completed")
    _shot(d, "prefect-runs")
