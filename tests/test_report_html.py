"""The HTML report, opened in a real browser (headless Chromium): table, text and images render."""

import shutil
import subprocess

import numpy as np
import pytest

from conftest import require_or_skip
from lpvit_compiler.report import LayerMeasurement
from matplotlib import image as mpimg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chromium(tmp_path):
    if CHROMIUM is None:
        require_or_skip("Chromium is not installed", "apt-get install chromium")

    def run(*args):
        done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


@pytest.fixture
def report_file(compiled, tmp_path):
    # as after `lpvit compile --bench --eval`: a measured figure per layer, end to end and accuracy
    report = compiled.report.with_measurements(
        layers={row.name: LayerMeasurement(2 * row.latency_predicted_us, 3 * row.latency_dense_us)
                for row in compiled.report.layers},
        end_to_end={"batches": {"1": {"dense_ms": 2.0, "compiled_ms": 1.0, "speedup": 2.0}}, "repeats": 3,
                    "threads": 2},
        accuracy={"data": "fashion-mnist", "images": 100, "dense": 0.9, "compiled": 0.89})
    assert not compiled.report.measurements.layers  # attaching measurements leaves the compile's report as it was
    return report.to_html(tmp_path / "report.html")


def test_report_renders_in_chromium(chromium, report_file, compiled, tmp_path):
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", report_file.as_uri())
    layers = [row.name for row in compiled.report.layers]
    # every image decoded (curve + mask per layer, and the predicted-vs-measured plot)
    assert f'data-images-loaded="{2 * len(layers) + 1}"' in dom
    assert f'data-images-total="{2 * len(layers) + 1}"' in dom
    for text in ["lpvit compile report", "target 0.500, achieved 0.5", "median error 50%", "2.00x",
                 "top-1 on fashion-mnist (100 images)", "dense 0.9000, compiled 0.8900", *layers]:
        assert text in dom, text
    assert dom.count("<tr>") >= len(layers) + 1

    chromium("--window-size=1200,1600", f"--screenshot={tmp_path / 'shot.png'}", report_file.as_uri())
    pixels = mpimg.imread(tmp_path / "shot.png")[..., :3]
    not_white = (pixels < 0.9).any(axis=-1).mean()
    assert 0.02 < not_white < 0.9, not_white  # text, table rules and figures, on a white page
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50  # anti-aliased text, plots


def test_report_html_is_self_contained(report_file):
    text = report_file.read_text()
    assert "src=\"http" not in text and "href=\"http" not in text
    assert text.count('src="data:image/png;base64,') >= 3
