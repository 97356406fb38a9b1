"""Reverse queries: which builds an image offers, and which one each machine type gets.

One report feeds both ``metahub inspect`` (a table) and ``GET /_metahub/v1/resolve`` (JSON), so
what an operator reads is exactly what a pull would do.
"""
from __future__ import annotations

from typing import Any

from metahub.config.file import Config
from metahub.hardware.families import needs
from metahub.hardware.machine import machine_types
from metahub.hardware.resolve import Entry, decide, entries, explain
from metahub.oci import media


def report(image: str, body: bytes, media_type: str, digest: str, config: Config) -> dict[str, Any]:
    """The builds in ``body`` and, per configured machine type, the one it resolves to (or why none)."""
    result: dict[str, Any] = {"image": image, "digest": digest, "media_type": media_type}
    if media_type not in media.INDEX_TYPES:
        result["entries"] = []
        result["machine_types"] = {
            name: {"digest": digest, "why": "single-platform image: served to every login as it is"}
            for name in config.machine_types
        }
        return result
    found = entries(body)
    result["entries"] = [
        {"position": e.position, "digest": e.digest, "media_type": e.media_type,
         "platform": e.describe(), "features": sorted(e.features), "needs": _needs(e)}
        for e in found
    ]
    result["machine_types"] = {}
    for name, machine_type in machine_types(config.machine_types).items():
        decision = decide(found, machine_type)
        winner = decision.winner
        result["machine_types"][name] = {
            "digest": winner.digest if winner else None,
            "position": winner.position if winner else None,
            "why": explain(found, machine_type),
            "match": machine_type.match,
            "beat": [{"position": e.position, "digest": e.digest, "why": why} for e, why in decision.beaten],
            "refused": [{"position": e.position, "digest": e.digest, "why": why} for e, why in decision.refused],
        }
    return result


def _needs(entry: Entry) -> str:
    """The hardware an entry needs, in words (under ``match: compatible``)."""
    if entry.os is None or entry.architecture is None:
        return "nothing runs it: it has no platform"
    words = needs(entry.features)
    if entry.architecture == "amd64" and entry.variant not in (None, "v1"):
        words.insert(0, f"amd64 level {entry.variant} or higher")
    platform = "/".join(part for part in (entry.os, entry.architecture, entry.variant) if part)
    return f"{platform}: " + ("; ".join(words) if words else "any machine of this platform")


def render(result: dict[str, Any]) -> str:
    """A plain-text table of a report, for terminals."""
    lines = [f"{result['image']}  {result['digest']}  ({result['media_type']})", ""]
    if result["entries"]:
        lines.append("  #  digest                                                                   platform")
        for entry in result["entries"]:
            lines.append(f"  {entry['position']:<2} {entry['digest']}  {entry['platform']}")
            lines.append(f"     needs {entry['needs']}")
        lines.append("")
    if result["machine_types"]:
        width = max(len(name) for name in result["machine_types"])
        lines.append(f"  {'machine type':<{max(width, 12)}}  gets")
        for name, choice in result["machine_types"].items():
            lines.append(f"  {name:<{max(width, 12)}}  {choice['why']}")
            for refused in choice.get("refused", []):
                lines.append(f"  {'':<{max(width, 12)}}    not manifests[{refused['position']}]: {refused['why']}")
    else:
        lines.append("  (no machine types configured)")
    return "\n".join(lines)
