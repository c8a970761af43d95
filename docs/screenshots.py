"""The README's UI images, of a real project: `tuneline ui` is started in PROJECT (a default
job with at least two registered versions, the second gated against the first) and the
pages a reviewer opens are saved to docs/img/ by headless Chromium, with the browser test's
helpers (tests/test_browser.py).

    python docs/screenshots.py /path/to/project [--model descrambler]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_ENV = dict(os.environ)
os.environ.setdefault("TUNELINE_SCREENSHOTS", str(REPO / "docs" / "img"))
sys.path.insert(0, str(REPO / "tests"))

import test_browser as tb  # noqa: E402
from conftest import free_port, http_json, http_ok, wait_for  # noqa: E402


def runs_of(project: Path, model: str) -> dict:
    """The experiment id, the stage runs of the pipeline that made v1, and v2's run."""
    code = (
        "import json, mlflow; c = mlflow.MlflowClient('sqlite:///mlflow.db')\n"
        f"v1, v2 = c.get_model_version('{model}', '1'), c.get_model_version('{model}', '2')\n"
        "r = c.get_run(v1.run_id); parent = r.data.tags.get('mlflow.parentRunId', r.info.run_id)\n"
        "kids = c.search_runs([r.info.experiment_id], f\"tags.`mlflow.parentRunId` = '{parent}'\")\n"
        "print(json.dumps({'exp': r.info.experiment_id, 'v2': v2.run_id,"
        " 'stages': {k.info.run_name: k.info.run_id for k in kids}}))"
    )
    out = subprocess.run(
        [str(project / ".venv/bin/python"), "-c", code], cwd=project, capture_output=True, text=True, check=True
    )
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--model", default="descrambler")
    a = ap.parse_args()
    project = a.project.resolve()
    ids = runs_of(project, a.model)
    mport, pport = free_port(), free_port()
    ui = subprocess.Popen(
        [str(project / ".venv/bin/tuneline"), "ui", "--mlflow-port", str(mport), "--prefect-port", str(pport)],
        cwd=project,
        # Not this process's (importing tuneline set PREFECT_HOME etc. to this checkout's)
        env={
            k: v for k, v in ORIGINAL_ENV.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
        },
        start_new_session=True,
    )
    mlflow, prefect = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{pport}"
    d = None
    try:
        wait_for("MLflow", lambda: http_ok(f"{mlflow}/health"), 180, ui)
        wait_for("Prefect", lambda: http_json(f"{prefect}/api/health"), 180, ui)
        d = tb.chromium()
        base = f"{mlflow}/#/experiments/{ids['exp']}"
        d.get(f"{base}/runs")
        tb._training_view(d)
        tb._shows(d, "tuneline", "Runs")
        tb._shot(d, "mlflow-runs")

        from selenium.webdriver.common.by import By

        d.get(f"{base}/runs/{ids['stages']['train']}/model-metrics")
        tb._until(
            d, "the chart search box", lambda: d.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric']")
        ).send_keys("loss")
        tb._shows(d, "train_loss", "val_loss")
        tb._shot(d, "mlflow-metric-charts")

        d.get(f"{base}/runs/{ids['stages']['evaluate']}/artifacts/predictions.json")
        tb._shows(d, "predictions.json", "tuned_output")
        tb._shot(d, "mlflow-predictions-table")

        d.get(f"{base}/runs/{ids['stages']['evaluate']}/artifacts")
        tb._click_text(d, "base_vs_tuned.png")
        tb._until(
            d,
            "the plot",
            lambda: d.execute_script("return [...document.images].some(i => i.complete && i.naturalWidth > 300)"),
        )
        tb._shot(d, "mlflow-base-vs-tuned")

        d.get(f"{mlflow}/#/models/{a.model}")
        tb._shows(d, a.model, "Version 2", "champion")
        tb._shot(d, "mlflow-registered-model")

        d.get(f"{mlflow}/#/models/{a.model}/versions/2")
        tb._shows(d, "Gate decision")
        tb._shot(d, "mlflow-model-card")

        d.get(f"{base}/runs/{ids['v2']}/artifacts/review/diff.html")
        tb._shows(d, "diff.html")
        d.switch_to.frame(tb._until(d, "the report", lambda: d.find_elements(By.TAG_NAME, "iframe"))[0])
        tb._shows(d, "Fixed (", "Broken (")
        d.switch_to.default_content()
        tb._shot(d, "mlflow-review")

        runs = http_json(f"{prefect}/api/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 5})
        first = runs[-1]["id"] if runs else None
        d.get(f"{prefect}/runs")
        tb._shows(d, "tuneline-pipeline", "Completed")
        tb._shot(d, "prefect-runs")
        if first:
            d.get(f"{prefect}/runs/flow-run/{first}")
            tb._shows(d, "Completed", *tb.STAGES)
            tb._shot(d, "prefect-flow-run")
            tb._click_text(d, "Task Runs")
            tb._shows(d, *tb.STAGES)
            tb._shot(d, "prefect-task-runs")
    finally:
        if d is not None:
            d.quit()
        import signal

        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(60)


if __name__ == "__main__":
    main()
