"""The compile report as one self-contained HTML file: summary, per-layer table, figures inlined as PNG.

Figures: per layer, the distortion curve (distortion vs keep ratio) with the chosen operating point — the
picture of the LPViT paper — and the block-mask heatmap (kept blocks light); predicted vs measured per-layer
latency where a benchmark ran. A small script marks on ``<body>`` how many images decoded
(``data-images-loaded`` of ``data-images-total``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..blocks import unpack_mask
from .summary import summary_items

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ddd; padding: 6px; width: 330px; }
.card h4 { margin: 2px 0 4px; font-size: 13px; }
.summary td { text-align: left; }
"""

IMAGES_LOADED_SCRIPT = """
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _curve_figure(row) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(2.3, 1.8))
    axis.plot(row.curve_keep_ratio, row.curve_distortion, lw=1.2)
    axis.plot([row.keep_ratio], [row.distortion], "o", color="tab:red")
    axis.set_xlabel("keep ratio", fontsize=7)
    axis.set_ylabel("distortion", fontsize=7)
    axis.tick_params(labelsize=6)
    figure.tight_layout()
    return _png(figure)


def _mask_figure(row) -> str:
    import matplotlib.pyplot as plt

    mask = unpack_mask(row.block_mask, *row.grid_shape).numpy()
    figure, axis = plt.subplots(figsize=(2.0, 1.8))
    axis.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    axis.set_xlabel(f"in blocks ({mask.shape[1]})", fontsize=7)
    axis.set_ylabel(f"out blocks ({mask.shape[0]})", fontsize=7)
    axis.tick_params(labelsize=6)
    figure.tight_layout()
    return _png(figure)


def _latency_figure(rows, measurements) -> str:
    import matplotlib.pyplot as plt

    measured = np.array([measurements[r.name].latency_us for r in rows])
    predicted = np.array([r.latency_predicted_us for r in rows])
    figure, axis = plt.subplots(figsize=(4.5, 3.5))
    axis.loglog(measured, predicted, "o", ms=4)
    low, high = min(measured.min(), predicted.min()) * 0.8, max(measured.max(), predicted.max()) * 1.25
    axis.plot([low, high], [low, high], "k--", lw=0.8, label="prediction = measurement")
    axis.set_xlabel("measured µs")
    axis.set_ylabel("predicted µs")
    axis.set_title("per-layer latency", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def _table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f'<table class="{css_class}">{thead}<tbody>{body}</tbody></table>'


def write_html(report, path) -> Path:
    layer_times = report.measurements.layers
    measured = [r for r in report.layers if r.name in layer_times]
    header = ["layer", "shape", "block", "layout", "kept/blocks", "keep", "distortion", "MFLOPs dense", "MFLOPs kept",
              "pred. µs dense", "pred. µs", "pred. mJ dense", "pred. mJ"]
    if measured:
        header += ["measured µs dense", "measured µs", "error"]
    rows = []
    for r in report.layers:
        row = [r.name, f"{r.weight_shape[0]}x{r.weight_shape[1]}", f"{r.block_shape[0]}x{r.block_shape[1]}",
               r.layout_and_epilogue,
               f"{r.kept_blocks}/{r.blocks}", f"{r.keep_ratio:.2f}", f"{r.distortion:.3g}",
               f"{r.flops_dense / 1e6:.1f}", f"{r.flops_kept / 1e6:.1f}", f"{r.latency_dense_us:.1f}",
               f"{r.latency_predicted_us:.1f}", f"{r.energy_dense_mj:.3f}", f"{r.energy_predicted_mj:.3f}"]
        if measured:
            m = layer_times.get(r.name)
            row += ([f"{m.dense_latency_us:.1f}", f"{m.latency_us:.1f}",
                     f"{(r.latency_predicted_us - m.latency_us) / m.latency_us:+.0%}"] if m else ["", "", ""])
        rows.append(row)
    cards = "".join(
        f'<div class="card"><h4>{html.escape(r.name)} — keep {r.keep_ratio:.2f}</h4>'
        f'<img alt="distortion curve of {html.escape(r.name)}" src="{_curve_figure(r)}">'
        f'<img alt="block mask of {html.escape(r.name)}" src="{_mask_figure(r)}"></div>'
        for r in report.layers)
    latency = (f'<h2>Predicted vs measured latency</h2><img alt="predicted vs measured latency" '
               f'src="{_latency_figure(measured, layer_times)}">' if measured else "")
    passes = _table(["pass", "seconds", "modified"], [[p["pass"], f"{p['seconds']:.2f}", p["modified"]]
                                                      for p in report.passes])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lpvit compile report</title><style>{STYLE}</style></head>
<body>
<h1>lpvit compile report</h1>
{_table([], summary_items(report), "summary")}
<h2>Layers</h2>
{_table(header, rows, "layers")}
{latency}
<h2>Distortion curves (red: chosen operating point) and block masks (white: kept)</h2>
<div class="cards">{cards}</div>
<h2>Passes</h2>
{passes}
<script>{IMAGES_LOADED_SCRIPT}</script>
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
