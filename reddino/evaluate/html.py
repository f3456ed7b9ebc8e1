"""One self-contained HTML page per evaluation: the comparison tables, per-class recall, the figures and the
model's learning curve when it came from a training run. Images are embedded (base64), so the single file
reads the same from the output folder, from an MLflow artifact view or attached to an e-mail."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from reddino.paths import write_text_atomic

from .report import markdown_report

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f3f3f3; }
td { text-align: right; } td:first-child, td:nth-child(2) { text-align: left; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figure img { max-width: 520px; border: 1px solid #eee; } figcaption { font-size: 12px; color: #555; }
"""


# Marks the body with how many images decoded, so a headless browser (the test) can tell the page rendered.
LOADED = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
          " document.body.dataset.images = im.length;"
          " document.body.dataset.imagesRendered = im.filter(i => i.complete && i.naturalWidth > 0).length; });"
          "</script>")


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def learning_curve_for(info: dict[str, Any]) -> Path | None:
    """The learning_curve.png the training run wrote beside the exported backbone, if there is one."""
    path = info.get("path")
    if not path:
        return None
    for folder in (Path(path).parent, Path(path).parent.parent):
        cand = folder / "learning_curve.png"
        if cand.is_file():
            return cand
    return None


def _recall_table(result: dict[str, Any]) -> str:
    classes = result.get("classes", {})
    clfs = list(result["classifiers"])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in clfs)
    rows = []
    for lab, name in classes.items():
        cells = []
        for c in clfs:
            pc = (result["classifiers"][c].get("pooled") or {}).get("per_class", {}).get(str(lab))
            cells.append(f"<td>{100 * pc['recall']:.1f}</td>" if pc else "<td>-</td>")
        n = result.get("class_counts", {}).get(str(lab), "")
        rows.append(f"<tr><td>{html.escape(str(name))}</td><td>{n}</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th>class</th><th>n</th>{head}</tr>{''.join(rows)}</table>" if rows else "")


def html_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.html`` into ``out_dir`` and return its path."""
    import markdown  # noqa: PLC0415

    out_dir = Path(out_dir)
    parts = [markdown.markdown(markdown_report(results), extensions=["tables"])]
    for model in results.get("models", []):
        parts.append(f"<h2>{html.escape(str(model['ref']))}</h2>")
        curve = learning_curve_for(model.get("info") or {})
        if curve is not None:
            parts.append("<h3>Learning curve of its training run</h3>" + _img(curve, f"{curve.parent.name}: "
                                                                                  "kNN, RankMe and losses by step"))
        for ev in model.get("evals", []):
            result = ev["result"]
            if result.get("classifiers") and any("pooled" in c for c in result["classifiers"].values()):
                parts.append(f"<h3>Per-class recall on {html.escape(ev['name'])} (%, pooled out-of-fold)</h3>")
                parts.append(_recall_table(result))
        figs = [Path(p) for p in model.get("figures", []) if Path(p).is_file()]
        if figs:
            parts.append("<h3>Figures</h3>" + "".join(_img(p, p.stem.split("__", 1)[-1].replace("__", " · "))
                                                       for p in figs))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>reddino evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}{LOADED}</body></html>\n")
    return write_text_atomic(out_dir / "report.html", page)
