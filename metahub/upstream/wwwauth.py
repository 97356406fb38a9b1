"""Parse ``WWW-Authenticate`` headers (RFC 9110 section 11.6.1) into challenges.

An upstream registry tells us how to authenticate only through this header, and the realm it names
is where metahub sends the configured credentials. So the parser is strict where a misreading could
send credentials to the wrong place (a duplicated parameter is an error, not "last one wins") and
tolerant where registries are sloppy in harmless ways: spaces around ``=`` and ``,``, empty list
elements, any case in scheme and parameter names, and unquoted values that hold ``/`` or ``:`` (a
bare ``realm=https://auth.example/token``), which the RFC's ``token`` grammar would reject.

A header may carry several challenges (``Bearer realm="..", Basic realm=".."``); commas separate
both challenges and the parameters inside one, and a challenge may carry a ``token68`` instead of
parameters (``Negotiate YIIB==``). The parser returns them all, in order, and leaves the choice to
the caller.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Challenge", "WWWAuthenticateError", "parse_challenges"]


class WWWAuthenticateError(ValueError):
    """The header is not a list of challenges; the message says where it stops making sense."""


@dataclass(frozen=True)
class Challenge:
    """One challenge: ``scheme`` and parameter names lower-cased, values unquoted and unescaped."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# token68 counts only when its list element ends right after it; "realm=x" starts with a match too.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|\Z))")
# Visible ASCII and obs-text, except the two characters that end a value: DQUOTE and comma.
_BARE_VALUE = re.compile(r"[!#-+\--~\x80-\xff]+")
# A quoted-string's content: qdtext and quoted-pairs (RFC 9110 section 5.6.4).
_QUOTED = re.compile(r'"((?:[\t !#-\[\]-~\x80-\xff]|\\[\t !-~\x80-\xff])*)"')
_QUOTED_PAIR = re.compile(r"\\(.)")
_PARAM_AHEAD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]*=")
_OWS = re.compile(r"[ \t]*")
_SEPARATORS = re.compile(r"[ \t,]*")
_EQUALS = re.compile(r"=")
_COMMA = re.compile(r",")


class _Scanner:
    """A cursor over the header text; each method consumes what it recognises or raises."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def skip(self, pattern: re.Pattern[str]) -> str:
        """Consume ``pattern``, one that may match nothing, and return what it took."""
        match = pattern.match(self.text, self.pos)
        assert match is not None, "skip() is for patterns that match the empty string"
        self.pos = match.end()
        return match.group()

    def take(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        match = pattern.match(self.text, self.pos)
        if match is None:
            raise self.error(f"expected {what}")
        self.pos = match.end()
        return match

    def error(self, why: str, pos: int | None = None) -> WWWAuthenticateError:
        at = self.pos if pos is None else pos
        found = repr(self.text[at]) if at < len(self.text) else "end of header"
        return WWWAuthenticateError(f"{why} at position {at}, found {found}")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in ``header``, in order; raise ``WWWAuthenticateError`` if it has none.

    Several ``WWW-Authenticate`` lines in one response are one list: join them with ``", "`` first.
    Decode bytes from the wire as latin-1, so that obs-text survives and decoding cannot fail.
    """
    scanner = _Scanner(header)
    challenges: list[Challenge] = []
    scanner.skip(_SEPARATORS)
    while not scanner.done():
        challenges.append(_challenge(scanner))
        scanner.skip(_OWS)
        if not scanner.done():
            scanner.take(_COMMA, "',' between challenges")
        scanner.skip(_SEPARATORS)
    if not challenges:
        raise WWWAuthenticateError("no challenge in header")
    return challenges


def _challenge(scanner: _Scanner) -> Challenge:
    """Read one challenge and stop before the separator that follows it."""
    scheme = scanner.take(_TOKEN, "an auth-scheme").group().lower()
    if scanner.skip(_OWS):
        token68 = _TOKEN68.match(scanner.text, scanner.pos)
        if token68 is not None:
            scanner.pos = token68.end()
            return Challenge(scheme, token68=token68.group())
    params: dict[str, str] = {}
    while True:
        # A parameter can never start a challenge, so one that follows (after any number of
        # separators) belongs to this scheme; between two parameters there must be a comma.
        gap = _SEPARATORS.match(scanner.text, scanner.pos)
        assert gap is not None
        if (params and "," not in gap.group()) or not _PARAM_AHEAD.match(scanner.text, gap.end()):
            return Challenge(scheme, params)
        scanner.pos = gap.end()
        name = scanner.take(_TOKEN, "a parameter name").group().lower()
        if name in params:
            raise scanner.error(f"parameter {name!r} given twice", gap.end())
        scanner.skip(_OWS)
        scanner.take(_EQUALS, "'='")
        scanner.skip(_OWS)
        params[name] = _value(scanner)
        scanner.skip(_OWS)


def _value(scanner: _Scanner) -> str:
    if scanner.text.startswith('"', scanner.pos):
        quoted = scanner.take(_QUOTED, "a closed quoted-string")
        return _QUOTED_PAIR.sub(r"\1", quoted.group(1))
    return scanner.take(_BARE_VALUE, "a parameter value").group()
