"""Checkpoints of a training run: the folder's layout, what each checkpoint records, and the
launcher's check that a run can save to or resume from a folder (no torch: the ranks save and
load them with torch.distributed.checkpoint, DCP, in executor/ranks/checkpointer.py).

A checkpoint folder (on a filesystem every node sees) holds:

    step-00000040/        one checkpoint: DCP's .metadata and a __R_0.distcp file per rank,
                          and meshplan.json (CheckpointInfo: what it was taken with)
    step-00000040.tmp/    a save in progress, or one a crash cut short (removed at the next start)
    latest                the name of the newest complete checkpoint

A save writes step-N.tmp with dcp.save on every rank; rank 0 then writes meshplan.json into
it, renames it to step-N and rewrites `latest` (core.io.write_atomic), so a crash at any
point leaves `latest` naming the previous complete checkpoint. The newest KEEP are kept.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from meshplan.core.errors import Issue, PlanError
from meshplan.core.fields import from_fields
from meshplan.core.io import read_json

FORMAT = "meshplan-checkpoint/1"
LATEST, INFO, DCP_METADATA = "latest", "meshplan.json", ".metadata"
KEEP = 2  # complete checkpoints kept: the newest, and the one before it
FIELD = "run.checkpoint_dir"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint was taken with: `step` is the next step to train (every step before
    it is in the checkpoint, and `losses` holds their losses), the model and plan (as
    dicts), the world size, and the run's seed, learning rate and token file."""

    step: int
    model: dict
    plan: dict
    world_size: int
    seed: int
    lr: float
    data: str | None
    losses: tuple[float, ...]
    format: str = FORMAT

    def to_json(self) -> dict:
        return {**asdict(self), "losses": list(self.losses)}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def latest(folder: str | Path) -> tuple[Path, CheckpointInfo] | None:
    """The newest complete checkpoint in `folder` and its info, or None when there is none;
    PlanError (run.checkpoint_dir) when `latest` names one that is missing or unreadable."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    try:
        data = read_json(path / INFO)
        info = from_fields(CheckpointInfo, data, f"{path / INFO}:", PlanError, "checkpoint info")
    except (OSError, ValueError) as exc:
        raise PlanError(FIELD, f"{pointer} names {path.name}, which cannot be read ({exc})",
                        "point `latest` at a complete step-* folder, or give another folder") from None
    typed = (isinstance(info.step, int) and isinstance(info.model, dict)
             and isinstance(info.plan, dict) and isinstance(info.losses, list))
    if info.format != FORMAT or not typed or not (path / DCP_METADATA).is_file():
        raise PlanError(FIELD, f"{path} is not a complete {FORMAT} checkpoint",
                        "point `latest` at a complete step-* folder, or give another folder")
    return path, replace(info, losses=tuple(info.losses))


def check_resume(folder: str, model: dict, plan: dict, resume: bool, seed: int,
                 data: str | None, steps: int, warmup: int) -> tuple[list[Issue], CheckpointInfo | None]:
    """What stops a run from saving to or resuming from `folder` (a file, an unwritable
    place, a checkpoint it would overwrite, one of another model or data stream, one already
    at the last step), and the checkpoint it resumes from. A plan that only differs in its
    parallel layout is no issue: DCP reshards the checkpoint into it."""
    model, plan = _as_saved(model), _as_saved(plan)
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return [(FIELD, f"{folder} is a file", "give a folder")], None
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:  # a folder made and removed there: permissions alone pass root on /proc or a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".meshplan-", dir=existing))
    except OSError as exc:
        return [(FIELD, f"{existing} is not writable ({exc.strerror})", "give a folder this user can write")], None
    found = latest(path) if path.is_dir() else None
    if found is None:
        return [], None
    where, info = found
    if not resume:
        return [(FIELD, f"{where} holds a checkpoint at step {info.step}",
                 "resume from it (--resume), or give an empty folder")], None
    issues = []
    if _architecture(info.model) != _architecture(model):
        issues.append((FIELD, f"{where} is of model {info.model.get('name')!r} "
                       f"({_differences(info.model, model)})",
                       "resume with the model it was taken with, or give another folder"))
    for key in ("global_batch", "seq_len"):
        if info.plan.get(key) != plan[key]:
            issues.append((f"plan.{key}", f"{where} was taken at {key} {info.plan.get(key)}, "
                           f"not {plan[key]}: its data position does not carry over",
                           f"resume with {key} {info.plan.get(key)}"))
    if info.data != data:
        issues.append(("run.data", f"{where} was trained on {info.data or 'synthetic tokens'}, "
                       f"not {data or 'synthetic tokens'}", "resume on the same data"))
    elif data is None and info.seed != seed:
        issues.append(("run.seed", f"{where} was trained on the synthetic tokens of seed "
                       f"{info.seed}, not {seed}", f"resume with seed {info.seed}"))
    if info.step >= steps:
        issues.append(("run.steps", f"{where} is at step {info.step}: a run of {steps} steps "
                       "has nothing left to do", f"run more than {info.step} steps"))
    elif warmup >= steps - info.step:
        issues.append(("run.warmup", f"{warmup} warm-up steps leave no timed step of the "
                       f"{steps - info.step} left after step {info.step}", "use fewer warm-up steps"))
    return issues, info


def _as_saved(fields: dict) -> dict:
    """`fields` as they read back from meshplan.json (tuples as lists)."""
    return json.loads(json.dumps(fields))


def _architecture(model: dict) -> dict:
    """A model's fields but its name (one config may be loaded under several names)."""
    return {k: v for k, v in model.items() if k != "name"}


def _differences(saved: dict, wanted: dict) -> str:
    keys = [k for k in saved.keys() | wanted.keys() if k != "name" and saved.get(k) != wanted.get(k)]
    return ", ".join(f"{k} {saved.get(k)!r} vs {wanted.get(k)!r}" for k in sorted(keys)[:4])


def relayout(info: CheckpointInfo, plan: dict) -> str | None:
    """How the plan's layout differs from the checkpoint's ("dp2 -> tp2"), or None."""
    keys = ("dp", "tp", "pp", "cp", "zero", "virtual_stages", "layer_partition")
    plan = _as_saved(plan)
    if all(info.plan.get(k) == plan[k] for k in keys):
        return None

    def layout(p: dict) -> str:
        parts = [f"{k}{p[k]}" for k in ("dp", "tp", "pp", "cp") if p.get(k, 1) > 1]
        if p.get("zero"):
            parts.append(f"zero{p['zero']}")
        if p.get("virtual_stages", 1) > 1:
            parts.append(f"v{p['virtual_stages']}")
        return " ".join(parts) or "1 rank"
    return f"{layout(info.plan)} -> {layout(plan)}"
