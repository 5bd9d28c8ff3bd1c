"""How far the whole model's predictions fall from published measured runs: the figures
benchmarks/published.py writes (hw_profiles/data/end_to_end.json), printed beside a
prediction's operator-level error band so that a user sees both."""
from __future__ import annotations

import json

from meshplan.hw_profiles.profile import END_TO_END


def end_to_end() -> dict | None:
    """{"held_out": {"rows", "median", "max"}, "fit": {...}, "date", "source"}, or None
    before the published suite has been run."""
    if not END_TO_END.is_file():
        return None
    try:
        data = json.loads(END_TO_END.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("held_out"), dict) else None


def end_to_end_text() -> str:
    data = end_to_end()
    if data is None:
        return "end to end: not measured (run python benchmarks/published.py --write)"
    held = data["held_out"]
    return (f"end to end against {held['rows']} held-out published runs (benchmarks/published, "
            f"{data['date']}): median |error| {held['median']:.0%}, max {held['max']:.0%}")
