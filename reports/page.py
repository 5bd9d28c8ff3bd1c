"""The one HTML page shell of meshplan's reports (what-if, calibration, validation, serving
validation, timeline): a self-contained page, plotly.js inlined once, so it opens offline.
A page is a title and a list of parts: HTML text, or plotly figures."""
from __future__ import annotations

import html

STYLE = ("body { font-family: sans-serif; margin: 1em 2em } "
         "table { border-collapse: collapse } td, th { padding: 2px 10px; text-align: right } "
         "tbody th { text-align: left }")


def heading(text: str, level: int = 2, anchor: str | None = None) -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return f"<h{level}{ident}>{html.escape(text)}</h{level}>"


def page(title: str, parts: list) -> str:
    """The page: <title> and <h1> from `title`; each part either HTML text (already escaped
    where needed), a plotly figure, or (figure, element id); plotly.js is inlined with the
    first figure."""
    body, charts = [heading(title, 1)], 0
    for part in parts:
        if isinstance(part, str):
            body.append(part)
            continue
        figure, ident = part if isinstance(part, tuple) else (part, f"chart-{charts}")
        body.append(figure.to_html(full_html=False, include_plotlyjs=charts == 0, div_id=ident))
        charts += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title>\n<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
