"""How far the whole model's predictions fall from published measured runs: the figures
benchmarks/published.py writes (hw_profiles/data/end_to_end.json), printed beside a
prediction's operator-level error band so that a user sees both."""
from __future__ import annotations

import json

from meshplan.hw_profiles.profile import END_TO_END


# The families of published runs a prediction's end-to-end error is quoted from: they fall far
# apart (held-out half, 2026-12-02: median 14.4% mixture of experts, 10.0% dense context
# parallel, 3.9% dense without).
KINDS = {"moe": "mixture of experts", "cp": "dense, context parallel", "dense": "dense, no context parallelism"}


def plan_kind(experts: int, cp: int) -> str:
    """The family (a KINDS key) of a plan of a model with `experts` routed experts and
    context-parallel degree `cp`."""
    return "moe" if experts else ("cp" if cp > 1 else "dense")


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


def end_to_end_text(kind: str | None = None) -> str:
    """The held-out figures, and those of the runs of family `kind` (plan_kind) among them."""
    data = end_to_end()
    if data is None:
        return "end to end: not measured (run python benchmarks/published.py --write)"
    held = data["held_out"]
    text = (f"end to end against {held['rows']} held-out published runs (benchmarks/published, "
            f"{data['date']}): median |error| {held['median']:.0%}, max {held['max']:.0%}")
    like = data.get("held_out_kinds", {}).get(kind)
    if like:
        text += (f"; the {like['rows']} of them like this plan ({KINDS[kind]}): median {like['median']:.0%}, "
                 f"max {like['max']:.0%}")
    return text
