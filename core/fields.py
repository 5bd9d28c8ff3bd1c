"""Building a frozen dataclass from a JSON object: every unknown and every missing key is
named at once, with what the known keys' own checks find, under the caller's field prefix
and error type."""
from __future__ import annotations

import dataclasses

from meshplan.core.errors import MeshplanError


def from_fields(cls, data, prefix: str, error: type[MeshplanError], what: str):
    """cls(**data) after checking data's keys against cls's fields: unknown keys and
    missing required ones become one `error` naming each as `prefix + key`."""
    if not isinstance(data, dict):
        raise error(prefix.rstrip(".") or what, f"is {type(data).__name__}, not a JSON object",
                    f"give the {what} as a JSON object")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    issues = [(prefix + key, f"unknown {what} key", f"use only {', '.join(sorted(known))}")
              for key in sorted(set(data) - known)]
    issues += [(prefix + key, f"missing {what} key", f"add \"{key}\"") for key in sorted(required - set(data))]
    if issues:
        if not required - set(data):  # the keys it knows, checked too: every offending field at once
            try:
                cls(**{k: v for k, v in data.items() if k in known})
            except MeshplanError as exc:
                issues += exc.issues
        raise error.of(issues)
    return cls(**data)
