"""``parse_challenges``: real registry headers, the RFC's corners, and hostile input."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metahub.upstream.wwwauth import Challenge, WWWAuthenticateError, parse_challenges


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
            id="docker-hub",
        ),
        pytest.param(
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:org/app:pull"',
            [
                Challenge(
                    "bearer",
                    {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:org/app:pull"},
                )
            ],
            id="ghcr",
        ),
        pytest.param(
            'Basic realm="Registry Realm"',
            [Challenge("basic", {"realm": "Registry Realm"})],
            id="distribution-htpasswd",
        ),
        pytest.param("BASIC Realm=x", [Challenge("basic", {"realm": "x"})], id="case-insensitive-scheme-and-name"),
        pytest.param("bEaReR realm=x", [Challenge("bearer", {"realm": "x"})], id="mixed-case-scheme"),
        pytest.param("Basic", [Challenge("basic")], id="scheme-alone"),
        pytest.param(
            'Bearer realm = "x" ,  service= y ,scope =z',
            [Challenge("bearer", {"realm": "x", "service": "y", "scope": "z"})],
            id="spaces-around-equals-and-commas",
        ),
        pytest.param("\t Basic\trealm=x\t", [Challenge("basic", {"realm": "x"})], id="tabs"),
        pytest.param(
            r'Basic realm="a \"quoted\" word, and a comma"',
            [Challenge("basic", {"realm": 'a "quoted" word, and a comma'})],
            id="escaped-quotes-and-comma-in-quoted-string",
        ),
        pytest.param(r'Basic realm="back\\slash\x"', [Challenge("basic", {"realm": "back\\slashx"})], id="quoted-pair"),
        pytest.param('Basic realm=""', [Challenge("basic", {"realm": ""})], id="empty-quoted-string"),
        pytest.param(
            "Bearer realm=https://auth.example/token?a=b,service=registry.example:5000",
            [Challenge("bearer", {"realm": "https://auth.example/token?a=b", "service": "registry.example:5000"})],
            id="unquoted-url-values",
        ),
        pytest.param(
            'Bearer realm="https://a/token", Basic realm="r"',
            [Challenge("bearer", {"realm": "https://a/token"}), Challenge("basic", {"realm": "r"})],
            id="two-challenges",
        ),
        pytest.param(
            'Basic realm="a", Bearer realm="b",error="invalid_token"',
            [Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b", "error": "invalid_token"})],
            id="second-challenge-has-params",
        ),
        pytest.param(
            "Basic, Bearer realm=x",
            [Challenge("basic"), Challenge("bearer", {"realm": "x"})],
            id="bare-scheme-then-challenge",
        ),
        pytest.param(
            "Negotiate YIIB+/a==, Bearer realm=x",
            [Challenge("negotiate", token68="YIIB+/a=="), Challenge("bearer", {"realm": "x"})],
            id="token68",
        ),
        pytest.param("Basic realm=", [Challenge("basic", token68="realm=")], id="token68-that-looks-like-a-name"),
        pytest.param(
            ",, Basic ,, Bearer realm=x,,",
            [Challenge("basic"), Challenge("bearer", {"realm": "x"})],
            id="empty-list-elements",
        ),
        pytest.param('Bearer ,realm="x"', [Challenge("bearer", {"realm": "x"})], id="empty-element-before-first-param"),
        pytest.param(
            'Bearer realm="x",,,scope="y"',
            [Challenge("bearer", {"realm": "x", "scope": "y"})],
            id="empty-elements-between-params",
        ),
        pytest.param("Basic nonce=YWJj==", [Challenge("basic", {"nonce": "YWJj=="})], id="equals-in-unquoted-value"),
        pytest.param("Basic realm==x", [Challenge("basic", {"realm": "=x"})], id="unquoted-value-starting-with-equals"),
        pytest.param("Basic realm=\xe9t\xe9", [Challenge("basic", {"realm": "\xe9t\xe9"})], id="obs-text"),
    ],
)
def test_parses(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


@pytest.mark.parametrize(
    ("header", "why"),
    [
        pytest.param("", "no challenge in header", id="empty"),
        pytest.param(" ,\t, ", "no challenge in header", id="only-separators"),
        pytest.param('Basic realm="open', "expected a closed quoted-string at position 12", id="unterminated-quote"),
        pytest.param('Basic realm="trailing\\', "expected a closed quoted-string", id="dangling-backslash"),
        pytest.param("Basic realm=x, realm=y", "parameter 'realm' given twice at position 15", id="duplicate-param"),
        pytest.param("Basic REALM=x, realm=y", "parameter 'realm' given twice", id="duplicate-param-other-case"),
        pytest.param("=x", "expected an auth-scheme at position 0", id="no-scheme"),
        pytest.param('"Basic"', "expected an auth-scheme", id="quoted-scheme"),
        pytest.param(
            "Basic realm=x realm=y", "expected ',' between challenges at position 14", id="missing-comma-between-params"
        ),
        pytest.param('Basic realm="x" service="y"', "expected ',' between challenges", id="missing-comma-after-quoted"),
        pytest.param(
            "Basic Bearer realm=x",
            "expected ',' between challenges at position 6",
            id="missing-comma-between-challenges",
        ),
        pytest.param('Basic realm="x"y', "expected ',' between challenges", id="junk-after-quoted-string"),
        pytest.param("Basic realm=x\r\nSet-Cookie: a=b", "expected ',' between challenges at position 13", id="crlf"),
        pytest.param('Basic realm="a\nb"', "expected a closed quoted-string", id="newline-in-quoted-string"),
        pytest.param("Basic realm=a\x00b", "expected ',' between challenges", id="nul"),
        pytest.param("Basic realm=\u20ac", "expected a parameter value at position 12", id="beyond-latin-1"),
        pytest.param("Basic/x", "expected ',' between challenges at position 5", id="token68-without-space"),
        pytest.param("Negotiate abc== def", "expected ',' between challenges", id="junk-after-token68"),
        pytest.param("Bearer realm=x,=y", "expected an auth-scheme at position 15", id="value-without-name"),
    ],
)
def test_rejects(header: str, why: str) -> None:
    with pytest.raises(WWWAuthenticateError) as raised:
        parse_challenges(header)
    assert why in str(raised.value)


def test_error_is_a_value_error() -> None:
    assert issubclass(WWWAuthenticateError, ValueError)


def test_error_names_what_it_found() -> None:
    with pytest.raises(WWWAuthenticateError, match=r"^expected ',' between challenges at position 6, found '\"'$"):
        parse_challenges('Basic "x"')
    with pytest.raises(WWWAuthenticateError, match="^expected a parameter value at position 13, found end of header$"):
        parse_challenges("Basic realm =")


# Any text, and text dense in the header's own punctuation (where a parser's corners are).
@given(st.one_of(st.text(alphabet=st.characters(max_codepoint=0x17F)), st.text(alphabet="Bb ,=\"\\\tarelm")))
def test_any_text_parses_or_raises_value_error(header: str) -> None:
    try:
        challenges = parse_challenges(header)
    except WWWAuthenticateError:
        return
    assert challenges
    for challenge in challenges:
        assert challenge.scheme == challenge.scheme.lower()
        assert all(name == name.lower() for name in challenge.params)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=8)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=12)


@given(
    st.lists(
        st.tuples(_token, st.dictionaries(_token, _value, max_size=4)),
        min_size=1,
        max_size=4,
    )
)
def test_round_trip(challenges: list[tuple[str, dict[str, str]]]) -> None:
    """Whatever a server can say with quoted strings comes back unchanged."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = ", ".join(
        scheme + (" " + ", ".join(f"{name}={quoted(value)}" for name, value in params.items()) if params else "")
        for scheme, params in challenges
    )
    assert parse_challenges(header) == [Challenge(scheme, params) for scheme, params in challenges]
