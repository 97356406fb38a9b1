"""Which entry of an image index a machine type gets (design.md, "Per-machine-type resolution").

Pure matching, no I/O and no Twisted: the manifest handler hands in the index bytes it already holds
and fetches the chosen child itself, and the CLI uses :func:`decide` to show a whole table of
decisions offline. Keeping the rule here, in one place, is what lets HEAD, GET and the CLI agree.

The rule for a machine type M under ``match: compatible`` (the default):

1. Candidates are entries of M's os and architecture whose features, ``platform.features`` and
   ``os.features`` together, are all satisfied by M's (:mod:`metahub.hardware.families`: a
   ``cpu:`` build runs on that CPU and its descendants, an ``nvcap:X.Y`` build on ``X.Z`` with
   Z >= Y, anything else literally). An entry without features is generic and always fits.
2. amd64: M's level is its variant, else the highest x86_64_vN its CPU descends from, else v1; an
   entry's variant (none means v1) may not be above it. Other architectures: variant equal when M
   sets one.
3. Ranking, first difference decides: (a) more features; (b) family by family in the order M lists
   its features, having one beats not, and of two the more specific wins; (c) the higher amd64
   level; (d) listed first.

``match: subset`` is the literal rule (every entry feature spelled in M's list; most features, then
listed first) and ``match: exact`` the original MetaHub rule (features equal to M's).

Indexes come from upstreams we do not control, so parsing is tolerant: an entry we cannot read is
skipped or treated as having no platform, which makes it never win, rather than failing the pull.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from metahub.config.features import amd64_level, family
from metahub.hardware.families import level_of, satisfied, specificity
from metahub.hardware.machine import MachineType
from metahub.oci import errors, media

__all__ = ["Decision", "Entry", "choose", "decide", "entries", "explain", "resolve"]

#: buildx writes attestation manifests into the index with this platform; they are not images.
_UNKNOWN = "unknown"
_AMD64 = "amd64"


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


@dataclass(frozen=True)
class Decision:
    """One machine type against one index: the winner, whom it beat and why, whom the rule refused."""

    winner: Entry | None
    beaten: tuple[tuple[Entry, str], ...]  # the other candidates, best first, each with why it lost
    refused: tuple[tuple[Entry, str], ...]  # entries that are not candidates, in index order, and why

    @property
    def candidates(self) -> list[Entry]:
        return ([self.winner] if self.winner else []) + [entry for entry, _ in self.beaten]


def entries(index_body: bytes) -> list[Entry]:
    """The readable entries of an index, in order; ``[]`` for anything that is not an index.

    Entries without a digest cannot be served, so they are skipped; an entry keeps its position
    in the original list either way, so messages point at the right ``manifests[N]``.
    """
    return _read(_manifests(index_body) or [])


def choose(entries: Sequence[Entry], machine_type: MachineType) -> Entry | None:
    """The entry ``machine_type`` gets, or None when no entry fits it."""
    candidates = [entry for entry in entries if _refusal(entry, machine_type) is None]
    return min(candidates, key=lambda entry: _rank(entry, machine_type), default=None)


def decide(entries: Sequence[Entry], machine_type: MachineType) -> Decision:
    """:func:`choose` with its reasons, for ``metahub inspect`` and ``/_metahub/v1/resolve``."""
    refused, ranked = [], []
    for entry in entries:
        refusal = _refusal(entry, machine_type)
        if refusal is None:
            ranked.append((_steps(entry, machine_type), entry))
        else:
            refused.append((entry, refusal))
    ranked.sort(key=lambda pair: tuple(step.value for step in pair[0]))
    if not ranked:
        return Decision(None, (), tuple(refused))
    best_steps, winner = ranked[0]
    beaten = tuple((entry, _why_beaten(best_steps, steps)) for steps, entry in ranked[1:])
    return Decision(winner, beaten, tuple(refused))


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
    decision = decide(entries, machine_type)
    winner = decision.winner
    if winner is None:
        return f"no match for {_machine_text(machine_type)}; {_offers_text(_offered(entries))}"
    return f"manifests[{winner.position}] {winner.describe()}: {_reason(decision, machine_type)}"


# --- matching ----------------------------------------------------------------------------------


def _refusal(entry: Entry, machine_type: MachineType) -> str | None:
    """Why ``entry`` is not a candidate for ``machine_type``, or None when it is one."""
    if not _has_platform(entry):
        return "no platform (an attestation or an unreadable entry): runs nowhere"
    if (entry.os, entry.architecture) != (machine_type.os, machine_type.architecture):
        return f"{entry.os}/{entry.architecture} is not {machine_type.os}/{machine_type.architecture}"
    compatible = machine_type.match == "compatible"
    if compatible and entry.architecture == _AMD64:
        needed, level = amd64_level(entry.variant), _level(machine_type)
        if needed is None:
            return f"variant {entry.variant!r} is not an amd64 level (v1..v4)"
        if needed > level:
            return f"needs amd64 level v{needed}, {machine_type.name} has v{level}"
    elif machine_type.variant is not None and entry.variant != machine_type.variant:
        return f"variant {entry.variant or '(none)'} is not {machine_type.variant}"
    if machine_type.match == "exact":
        if entry.features != frozenset(machine_type.features):
            return f"features are not exactly {machine_type.name}'s (match: exact)"
        return None
    missing = sorted(feature for feature in entry.features if not _satisfied(feature, machine_type))
    if not missing:
        return None
    if compatible:
        return f"needs {', '.join(missing)}, which {machine_type.name} does not run"
    return f"needs {', '.join(missing)}, not spelled in {machine_type.name}'s features (match: subset)"


def _satisfied(feature: str, machine_type: MachineType) -> bool:
    if machine_type.match == "compatible":
        return satisfied(feature, machine_type.features)
    return feature in machine_type.features


def _level(machine_type: MachineType) -> int:
    return level_of(machine_type.features, machine_type.variant)


@dataclass(frozen=True)
class _Step:
    """One ranking criterion for one entry: ``value`` sorts best first, ``shown`` says it in words."""

    criterion: str
    value: tuple[int, ...]
    shown: str


def _rank(entry: Entry, machine_type: MachineType) -> tuple[tuple[int, ...], ...]:
    """The sort key of a candidate (rule step 3), smallest best; :func:`_steps` says it in words.

    Sorting on ``position`` rather than trusting the sequence's order keeps "listed first" true
    even if a caller filtered or reordered the entries. Under ``exact`` every candidate has the
    same features, so only the position decides.
    """
    key: list[tuple[int, ...]] = [(-len(entry.features),)]
    if machine_type.match == "compatible":
        for name in _families(machine_type.features):
            best = _most_specific(entry, name)
            key.append((1, 0) if best is None else (0, -specificity(best)))
        if entry.architecture == _AMD64:
            key.append((-(amd64_level(entry.variant) or 1),))
    key.append((entry.position,))
    return tuple(key)


def _steps(entry: Entry, machine_type: MachineType) -> list[_Step]:
    """:func:`_rank` criterion by criterion, with what this entry shows on each."""
    key = iter(_rank(entry, machine_type))
    count = len(entry.features)
    steps = [_Step("more features", next(key), f"{count} feature{'s' if count != 1 else ''}")]
    if machine_type.match == "compatible":
        for name in _families(machine_type.features):
            best = _most_specific(entry, name)
            criterion = f"a {name} build" if best is None else f"a more specific {name} build"
            steps.append(_Step(criterion, next(key), best or f"no {name} feature"))
        if entry.architecture == _AMD64:
            steps.append(_Step("a higher amd64 level", next(key), f"v{amd64_level(entry.variant) or 1}"))
    steps.append(_Step("listed first", next(key), f"manifests[{entry.position}]"))
    return steps


@lru_cache(maxsize=1024)
def _families(machine_features: tuple[str, ...]) -> tuple[str, ...]:
    """The machine type's feature families, each once, in the order it lists them (step 3b)."""
    return tuple(dict.fromkeys(family(feature) for feature in machine_features))


def _most_specific(entry: Entry, name: str) -> str | None:
    own = [feature for feature in entry.features if family(feature) == name]
    return max(sorted(own), key=specificity) if own else None  # sorted: the same words every time


def _why_beaten(winner: Sequence[_Step], loser: Sequence[_Step]) -> str:
    for ours, theirs in zip(winner, loser):
        if ours.value != theirs.value:
            return f"{ours.criterion}: {ours.shown} against {theirs.shown}"
    raise AssertionError("two candidates rank equal, yet positions differ")


def _has_platform(entry: Entry) -> bool:
    """Entries without a real platform (buildx attestations say unknown/unknown) never run anywhere."""
    return entry.os not in (None, _UNKNOWN) and entry.architecture not in (None, _UNKNOWN)


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


def _reason(decision: Decision, machine_type: MachineType) -> str:
    winner, beaten = decision.winner, decision.beaten
    assert winner is not None
    if machine_type.match == "exact":
        return "the first entry whose features equal the machine type's"
    if not beaten:
        return "the only candidate"
    if machine_type.match == "compatible":
        return f"the best of {len(beaten) + 1} candidates; " + "; ".join(
            f"beat manifests[{entry.position}] by {why}" for entry, why in beaten)
    reason = f"the most features of {len(beaten) + 1} candidates"
    tied = [e.position for e, _ in beaten if len(e.features) == len(winner.features)]
    if tied:
        reason += f", listed before {', '.join(f'manifests[{p}]' for p in sorted(tied))} with as many"
    return reason
