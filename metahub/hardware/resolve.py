"""Which entry of an image index a machine type gets (design.md, "Per-machine-type resolution").

Pure matching, no I/O and no Twisted: the manifest handler hands in the index bytes it already holds
and fetches the chosen child itself, and the CLI uses :func:`explain` to show a whole table of
decisions offline. Keeping the rule here, in one place, is what lets HEAD, GET and the CLI agree.

The rule, for a machine type M:

1. Candidates are entries of M's platform (os and architecture equal; variant equal when M sets
   one) whose features, ``platform.features`` and ``os.features`` together, are all among M's. An
   entry without features is generic and fits every machine type of its platform.
2. The candidate with the most features wins; a tie goes to the entry listed first.
3. ``match: exact`` (the original MetaHub rule) admits only entries whose features equal M's.

Indexes come from upstreams we do not control, so parsing is tolerant: an entry we cannot read is
skipped or treated as having no platform, which makes it never win, rather than failing the pull.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from metahub.config.file import MachineType
from metahub.oci import errors, media

__all__ = ["Entry", "choose", "entries", "explain", "resolve"]

#: buildx writes attestation manifests into the index with this platform; they are not images.
_UNKNOWN = "unknown"


@dataclass(frozen=True)
class Entry:
    """One entry of an OCI image index or Docker manifest list, as far as matching cares."""

    position: int  # 0-based place in the index's ``manifests``: the tie-breaker
    digest: str
    media_type: str
    size: int
    os: str | None
    architecture: str | None
    variant: str | None
    features: frozenset[str]  # platform.features ∪ platform["os.features"]

    def describe(self) -> str:
        """``linux/amd64 [cpu:broadwell, nvcap:5.2]`` or ``linux/arm64/v8 (generic)``."""
        if self.os is None or self.architecture is None:
            return "no platform"
        return _labelled(_platform_name(self.os, self.architecture, self.variant), self.features, "(generic)")


def entries(index_body: bytes) -> list[Entry]:
    """The readable entries of an index, in order; ``[]`` for anything that is not an index.

    Entries without a digest cannot be served, so they are skipped; an entry keeps its position
    in the original list either way, so messages point at the right ``manifests[N]``.
    """
    return _read(_manifests(index_body) or [])


def choose(entries: Sequence[Entry], machine_type: MachineType) -> Entry | None:
    """The entry ``machine_type`` gets, or None when no entry fits it."""
    return _winner(_candidates(entries, machine_type))


def resolve(index_body: bytes, machine_type: MachineType, reference: str) -> Entry:
    """The entry ``machine_type`` gets from the index pulled as ``reference`` (e.g. ``team/bench:1.0``).

    Raises a 404 MANIFEST_UNKNOWN :class:`~metahub.oci.errors.RegistryError` when the body is not an
    index or no entry fits: serving some other build instead would silently run the wrong binary
    on that hardware, and the message says what the index does offer so the fix is obvious.
    """
    listed = _manifests(index_body)
    if listed is None:
        raise errors.manifest_unknown(
            reference,
            f"{reference} is not a valid image index or manifest list, so no build can be chosen "
            f"for machine type {machine_type.name}",
            {"reference": reference, "machine_type": machine_type.name},
        )
    found = _read(listed)
    winner = choose(found, machine_type)
    if winner is None:
        raise _no_match(found, machine_type, reference)
    return winner


def explain(entries: Sequence[Entry], machine_type: MachineType) -> str:
    """One line for the CLI's table: which entry wins and why, or why none fits."""
    candidates = _candidates(entries, machine_type)
    winner = _winner(candidates)
    if winner is None:
        return f"no match for {_machine_text(machine_type)}; {_offers_text(_offered(entries))}"
    return f"manifests[{winner.position}] {winner.describe()}: {_reason(winner, candidates, machine_type)}"


# --- matching ----------------------------------------------------------------------------------


def _candidates(entries: Sequence[Entry], machine_type: MachineType) -> list[Entry]:
    return [entry for entry in entries if _fits(entry, machine_type)]


def _winner(candidates: Sequence[Entry]) -> Entry | None:
    """Most features, then listed first.

    Sorting on ``position`` rather than trusting the sequence's order keeps "listed first" true
    even if a caller filtered or reordered the entries. Under ``exact`` every candidate has the
    same features, so this is simply the first one listed.
    """
    return min(candidates, key=lambda entry: (-len(entry.features), entry.position), default=None)


def _fits(entry: Entry, machine_type: MachineType) -> bool:
    return (
        _has_platform(entry)
        and entry.os == machine_type.os
        and entry.architecture == machine_type.architecture
        and (machine_type.variant is None or entry.variant == machine_type.variant)
        and _features_fit(entry.features, machine_type)
    )


def _has_platform(entry: Entry) -> bool:
    """Entries without a real platform (buildx attestations say unknown/unknown) never run anywhere."""
    return entry.os not in (None, _UNKNOWN) and entry.architecture not in (None, _UNKNOWN)


def _features_fit(features: frozenset[str], machine_type: MachineType) -> bool:
    if machine_type.match == "exact":
        return features == frozenset(machine_type.features)
    return features <= frozenset(machine_type.features)


# --- parsing -----------------------------------------------------------------------------------


def _manifests(index_body: bytes) -> list[Any] | None:
    """The index's ``manifests`` list, or None when the body is not an index.

    ``mediaType`` is optional in an OCI index, so its absence is fine; a body that declares itself
    something else (a single image's manifest) is not an index whatever keys it carries.
    """
    doc = media.load(index_body)
    declared, listed = doc.get("mediaType"), doc.get("manifests")
    if not (declared is None or (isinstance(declared, str) and declared in media.INDEX_TYPES)):
        return None
    return listed if isinstance(listed, list) else None


def _read(listed: list[Any]) -> list[Entry]:
    return [entry for position, raw in enumerate(listed) if (entry := _entry(position, raw)) is not None]


def _entry(position: int, raw: object) -> Entry | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("digest"), str) or not raw["digest"]:
        return None
    media_type, size = raw.get("mediaType"), raw.get("size")
    os_, architecture, variant, features = _platform(raw.get("platform"))
    return Entry(
        position=position,
        digest=raw["digest"],
        media_type=media_type if isinstance(media_type, str) else "",
        size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
        os=os_,
        architecture=architecture,
        variant=variant,
        features=features,
    )


_NO_PLATFORM: tuple[None, None, None, frozenset[str]] = (None, None, None, frozenset())


def _platform(raw: object) -> tuple[str | None, str | None, str | None, frozenset[str]]:
    """``(os, architecture, variant, features)`` of a descriptor's ``platform``.

    A platform we cannot fully read counts as none at all: guessing (say, dropping a malformed
    feature list) could make a build that needs special hardware look generic and win.
    """
    if not isinstance(raw, dict):
        return _NO_PLATFORM
    os_, architecture, variant = raw.get("os"), raw.get("architecture"), raw.get("variant")
    features, os_features = raw.get("features"), raw.get("os.features")
    if not (
        _is_name(os_) and _is_name(architecture) and (variant is None or isinstance(variant, str))
        and _is_names(features) and _is_names(os_features)
    ):
        return _NO_PLATFORM
    return os_, architecture, variant or None, frozenset(features or ()) | frozenset(os_features or ())


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_names(value: object) -> bool:
    """An optional list of strings (absent and ``null`` both mean no features)."""
    return value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# --- messages ----------------------------------------------------------------------------------


def _no_match(found: Sequence[Entry], machine_type: MachineType, reference: str) -> errors.RegistryError:
    offered = _offered(found)
    return errors.manifest_unknown(
        reference,
        f"no build of {reference} fits machine type {_machine_text(machine_type)}; {_offers_text(offered)}",
        {
            "machine_type": machine_type.name,
            "offered": [
                {"platform": _platform_name(e.os, e.architecture, e.variant), "features": sorted(e.features),
                 "digest": e.digest}
                for e in offered
            ],
        },
    )


def _offered(found: Sequence[Entry]) -> list[Entry]:
    """What the index has for real platforms; attestations and unreadable entries are noise here."""
    return [entry for entry in found if _has_platform(entry)]


def _offers_text(offered: Sequence[Entry]) -> str:
    """Each distinct build once: the detail keeps every digest, the message stays readable."""
    offers = dict.fromkeys(entry.describe() for entry in offered)
    if not offers:
        return "the index offers no build with a platform"
    return "the index offers: " + ", ".join(offers)


def _machine_text(machine_type: MachineType) -> str:
    """``type9 (linux/amd64 [cpu:zen4])``: the name a user logs in with and what it stands for."""
    platform = _platform_name(machine_type.os, machine_type.architecture, machine_type.variant)
    return f"{machine_type.name} ({_labelled(platform, machine_type.features, '(no features)')})"


def _platform_name(os_: str | None, architecture: str | None, variant: str | None) -> str:
    return "/".join(part for part in (os_, architecture, variant) if part)


def _labelled(platform: str, features: Collection[str], featureless: str) -> str:
    """Features sorted, so one build reads the same whatever order its index listed them in."""
    return f"{platform} [{', '.join(sorted(features))}]" if features else f"{platform} {featureless}"


def _reason(winner: Entry, candidates: Sequence[Entry], machine_type: MachineType) -> str:
    if machine_type.match == "exact":
        return "the first entry whose features equal the machine type's"
    if len(candidates) == 1:
        return "the only candidate"
    reason = f"the most features of {len(candidates)} candidates"
    tied = [e.position for e in candidates if e is not winner and len(e.features) == len(winner.features)]
    if tied:
        reason += f", listed before {', '.join(f'manifests[{p}]' for p in sorted(tied))} with as many"
    return reason
