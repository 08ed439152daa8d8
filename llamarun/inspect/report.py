"""The attention report: one self-contained HTML page (attention.html, data embedded, drawn on a
canvas by plain JavaScript, nothing fetched) and, with --png, the same maps as PNG files.

The page stores each map's lower triangle as bytes round(255 * sqrt(weight)): one byte per weight
keeps the file small (SmolLM2, 30 layers x 9 heads, 64 tokens: 0.7 MB), and the square root keeps
the small weights that a linear scale would round to 0 (the page colours by sqrt(weight) too).
"""
from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path

import numpy as np

from .attention import AttentionRecord


def quantized_triangles(probs: np.ndarray) -> bytes:
    """(L, H, T, T) weights -> for each map, rows 0..T-1 of its lower triangle (keys 0..i), as bytes
    round(255 * sqrt(w)), map after map in (layer, head) order."""
    L, H, T, _ = probs.shape
    rows, cols = np.tril_indices(T)                 # row-major: row 0, then row 1's keys 0..1, ...
    tri = probs[:, :, rows, cols]                   # (L, H, T(T+1)/2)
    return np.rint(np.sqrt(np.clip(tri, 0.0, 1.0)) * 255).astype(np.uint8).tobytes()


def page_data(record: AttentionRecord) -> dict:
    L, H = record.probs.shape[:2]
    return {"model": record.model, "tokens": record.labels, "n_prompt": record.n_prompt,
            "n_layers": L, "n_heads": H, "emphasis": record.emphasis, "emphasized": record.emphasized,
            "probs": base64.b64encode(quantized_triangles(record.probs)).decode("ascii")}


def render_html(record: AttentionRecord) -> str:
    template = resources.files("llamarun.inspect").joinpath("attention.html").read_text("utf-8")
    data = json.dumps(page_data(record), ensure_ascii=True).replace("</", "<\\/")   # safe inside <script>
    return template.replace("__TITLE__", html.escape(record.model)).replace("__DATA__", data)


def write_html(record: AttentionRecord, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_html(record), encoding="utf-8")
    return path


def write_pngs(record: AttentionRecord, folder: str | Path) -> list[Path]:
    """One PNG per layer, layer_NN.png: the mean over heads, then every head, as the page draws them
    (colour = sqrt(weight), viridis). -> the paths written."""
    import matplotlib
    matplotlib.use("Agg")                           # files only, no display
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    L, H, T, _ = record.probs.shape
    labels = [label.replace(" ", "\u00b7").replace("\n", "\\n") for label in record.labels]
    upper = np.triu(np.ones((T, T), bool), k=1)     # keys after the query: not attended, left blank
    columns = min(H + 1, 5)
    rows = -(-(H + 1) // columns)
    size = max(3.0, min(8.0, 0.12 * T))
    written = []
    for layer in range(L):
        fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * size), squeeze=False)
        maps = [("mean over heads", record.probs[layer].mean(axis=0))] + \
               [(f"head {h}", record.probs[layer, h]) for h in range(H)]
        for ax, (title, m) in zip(axes.flat, maps):
            ax.imshow(np.ma.masked_array(np.sqrt(m), upper), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {layer}, {title}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
        if T <= 64:                                 # token labels on the mean's axes (text is what costs time)
            axes[0, 0].set_xticks(range(T), labels, rotation=90, fontsize=6)
            axes[0, 0].set_yticks(range(T), labels, fontsize=6)
        for ax in axes.flat[len(maps):]:
            ax.axis("off")
        fig.tight_layout()
        path = folder / f"layer_{layer:02d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
