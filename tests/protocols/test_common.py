"""proxyd.protocols.common.canonical_host: one form of every target name (UTS #46),
what rules match, what is looked up, what parents are sent and what is logged."""

from __future__ import annotations

import idna
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxyd.protocols.common import canonical_host, packed_ip

# Look-alike spellings of ASCII, written out here rather than taken from the code
# under test: full width (U+FF01..U+FF5E are U+0021..U+007E), and the dots UTS #46
# maps to "." (ideographic, full-width, halfwidth ideographic full stops).
DOTS = [".", "\u3002", "\uff0e", "\uff61"]


def full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@pytest.mark.parametrize(
    ("given_host", "canonical"),
    [
        ("localhost", "localhost"),
        ("LOCALHOST", "localhost"),
        ("LocalHost", "localhost"),
        ("localhost.", "localhost"),
        ("ｌｏｃａｌｈｏｓｔ", "localhost"),  # noqa: RUF001 (the look-alike is the point)
        ("ＬＯＣＡＬＨＯＳＴ", "localhost"),  # noqa: RUF001
        ("localhost\u3002", "localhost"),
        ("metadata\u3002google\u3002internal", "metadata.google.internal"),
        ("metadata\uff0egoogle\uff61internal", "metadata.google.internal"),
        ("Metadata.Google.Internal.", "metadata.google.internal"),
        ("local\u00adhost", "localhost"),  # a soft hyphen is ignored
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("ß.de", "xn--zca.de"),  # non-transitional: not "ss.de"
        ("foo_bar.example", "foo_bar.example"),  # hosts files and DNS carry "_"
        ("a\uff3fb", "a_b"),  # a full-width low line is "_" too
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("\uff11\uff12\uff17.0.0.1", "127.0.0.1"),  # full-width digits: the same address
        ("::1", "::1"),
        ("2001:DB8::1", "2001:DB8::1"),  # IP literals are left as they are
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        (".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4)),  # 255: SOCKS5's most
    ],
)
def test_canonical_forms(given_host: str, canonical: str) -> None:
    assert canonical_host(given_host) == canonical


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "a..b",
        "localhost..",
        ".localhost",
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 4) + "a",  # 256 characters
        "sp ace",
        "tab\there",
        "nul\x00.example",
        "evil.com\\@good.test",
        "evil.com/x",
        "a:b",  # neither an IPv6 address nor a name
        "fe80::1%eth0",  # a zone is no part of a target
        "x%41.example",
        "*.example",
        "a\u3002\u3002b",  # an empty label, in ideographic full stops
        "xn--localhost-",  # punycode of an ASCII label: a second spelling of "localhost"
        "xn--zz",  # not punycode at all
        "\u0301a.example",  # a label may not start with a combining mark
        "a\u200db.example",  # ZERO WIDTH JOINER outside its context (CONTEXTJ)
        "\ufffd.example",
        "\U000e0001.example",  # a tag character
    ],
)
def test_unmappable_names_are_refused(host: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(host)


# -- properties -----------------------------------------------------------------

ascii_labels = st.from_regex(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"  # xn-- and its kind are punycode's, not plain names
)
plain_names = st.lists(ascii_labels, min_size=1, max_size=6).map(".".join)


@st.composite
def look_alikes(draw: st.DrawFn, name: str) -> str:
    """`name` spelled another way: letters in capitals or full width, other dots, a
    trailing dot."""
    labels = []
    for label in name.split("."):
        chars = []
        for c in label:
            kind = draw(st.sampled_from(["same", "upper", "wide", "wide upper"]))
            if "upper" in kind:
                c = c.upper()
            if "wide" in kind:
                c = full_width(c)
            chars.append(c)
        labels.append("".join(chars))
    text = labels[0]
    for label in labels[1:]:
        text += draw(st.sampled_from(DOTS)) + label
    if draw(st.booleans()):
        text += draw(st.sampled_from(DOTS))
    return text


@given(data=st.data(), name=plain_names)
@example(data=None, name="localhost")
def test_a_look_alike_is_the_plain_name(data: st.DataObject | None, name: str) -> None:
    assert canonical_host(name) == name
    if data is not None:
        assert canonical_host(data.draw(look_alikes(name))) == name


# Text built from pieces that make names (and the odd thing that breaks one).
name_text = st.text(
    alphabet=st.one_of(
        st.sampled_from("abcxyzABCXYZ019-_." + "".join(DOTS)),
        st.sampled_from("üÜßẞςΣéЁжあ一\u00ad\u0301\u200c\u200d \\%:@"),
        st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E),  # full width
        st.characters(),
    ),
    max_size=40,
)


@given(name_text)
@example("ｌｏｃａｌｈｏｓｔ")  # noqa: RUF001
@example("xn--bcher-kva.example")
def test_canonical_is_ascii_and_idempotent(host: str) -> None:
    try:
        canonical = canonical_host(host)
    except ValueError:
        return
    assert canonical.isascii()
    assert canonical_host(canonical) == canonical
    if packed_ip(host) is None:  # a name: lower case, no trailing dot, labels 1..63
        assert canonical == canonical.lower()
        assert all(0 < len(label) <= 63 for label in canonical.split("."))


@given(name_text)
def test_what_idna_accepts_is_mapped_as_idna_maps_it(host: str) -> None:
    """Wherever the idna package's UTS #46 encoding succeeds (it refuses "_", which
    canonical_host keeps), the result is the same name."""
    try:
        encoded = idna.encode(host, uts46=True, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError):
        return
    expected = encoded.decode("ascii")
    if expected.endswith("."):
        expected = expected[:-1]
    assert canonical_host(host) == expected
