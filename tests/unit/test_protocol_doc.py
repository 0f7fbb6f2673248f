"""docs/PROTOCOL.md is the whole specification: every type, field, code, limit and example in it.

The document is read as data: a package type or body field added to ``package.py`` without its
entry in the document fails here, and so does a hex example that does not decode to what the
document says it is.
"""

from __future__ import annotations

import ast
import re
import types
import typing
from typing import Any

import msgspec
import pytest

import actions
import config
import database
import package
import protocol
from package import PACKAGE, ErrorCode, body_type
from protocol import FrameDecoder, encode_frame
from tests.helpers import ROOT

DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
HEADING = re.compile(r"^#{1,6} .*$", re.MULTILINE)
TYPE_HEADING = re.compile(r"^#### `(\w+)` = (\d+)$", re.MULTILINE)
RECORD_HEADING = re.compile(r"^#### `(\w+)` \(record\)$", re.MULTILINE)
FIELD_ROW = re.compile(r"^\| `(\w+)` \| `([^`]+)` \| ([^|]+?) \|", re.MULTILINE)
EXAMPLE = re.compile(
    r"```hex\n(?P<hex>.*?)```\s*decodes to:\s*```text\n"
    r"type (?P<kind>\d+) (?P<name>\w+), request id (?P<request_id>\d+), "
    r"timeout (?P<timeout_ms>\d+) ms, flags (?P<flags>\d+)\n"
    r"body (?P<body>.*?)\n```",
    re.DOTALL,
)


def section(heading: str) -> str:
    """The text under the heading line ``heading``, up to the next heading of any level."""
    match = re.search(rf"^{re.escape(heading)}$", DOC, re.MULTILINE)
    assert match is not None, f"docs/PROTOCOL.md has no heading {heading!r}"
    following = HEADING.search(DOC, match.end())
    return DOC[match.end() : following.start() if following else len(DOC)]


def wire_type(tp: Any) -> str:
    """The document's notation for a body field's type (see its table of field types)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:  # constraints (a range, say) are described in prose
        return wire_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        named = [wire_type(arg) for arg in args if arg is not type(None)]
        return " | ".join(named + ["nil"] * (type(None) in args))
    if origin is list:
        return f"list[{wire_type(typing.get_args(tp)[0])}]"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"map[{wire_type(key)}, {wire_type(value)}]"
    if tp is Any:
        return "any"
    if tp in (str, bytes, int, float, bool):
        return str(tp.__name__)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp.__name__
    raise AssertionError(f"docs/PROTOCOL.md has no notation for the type {tp!r}")


def wire_default(field: msgspec.structs.FieldInfo) -> str:
    """The document's notation for a field's default: ``required``, ``nil`` or a literal."""
    if field.required:
        return "required"
    default = field.default
    if default is msgspec.NODEFAULT:
        default = field.default_factory()
    if default is None:
        return "nil"
    return f"`{msgspec.json.encode(default).decode()}`"


def records(cls: type[msgspec.Struct]) -> set[type[msgspec.Struct]]:
    """Structs nested in the fields of ``cls`` (e.g. ``KvItem``), at any depth."""
    found: set[type[msgspec.Struct]] = set()
    pending = [field.type for field in msgspec.structs.fields(cls)]
    while pending:
        tp = pending.pop()
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            if tp not in found:
                found.add(tp)
                pending += [field.type for field in msgspec.structs.fields(tp)]
        else:
            pending += typing.get_args(tp)
    return found


def assert_fields_documented(cls: type[msgspec.Struct], text: str, where: str) -> None:
    text = text.replace("\\|", "|")  # a | inside a table cell is escaped in Markdown
    documented = {name: (tp, default) for name, tp, default in FIELD_ROW.findall(text)}
    fields = msgspec.structs.fields(cls)
    if not fields:
        assert "No fields" in text and not documented, f"{where}: say it has no fields"
    expected = {f.encode_name: (wire_type(f.type), wire_default(f)) for f in fields}
    assert documented == expected, f"{where}: the table of fields differs from {cls.__name__}"


# ---- every type, field and code is specified -------------------------------------------------


@pytest.mark.parametrize("kind", list(PACKAGE), ids=lambda kind: kind.name)
def test_every_package_type_is_specified_with_all_its_fields(kind: PACKAGE) -> None:
    heading = f"#### `{kind.name}` = {kind.value}"
    assert_fields_documented(body_type(kind), section(heading), heading)
    assert f"\n| {kind.value} | `{kind.name}` |" in section("## Package types")


def test_the_document_specifies_no_other_types() -> None:
    documented = {(name, int(number)) for name, number in TYPE_HEADING.findall(DOC)}
    assert documented == {(kind.name, kind.value) for kind in PACKAGE}


def test_every_record_inside_a_body_is_specified() -> None:
    nested = set().union(*(records(body_type(kind)) for kind in PACKAGE))
    assert nested, "no body holds a record: this test checks nothing"
    assert set(RECORD_HEADING.findall(DOC)) == {record.__name__ for record in nested}
    for record in nested:
        heading = f"#### `{record.__name__}` (record)"
        assert_fields_documented(record, section(heading), heading)


def test_every_error_code_is_specified() -> None:
    table = section("### Error codes")
    rows = {
        (int(number), name) for number, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", table, re.M)
    }
    assert rows == {(code.value, code.name) for code in ErrorCode}


def test_the_notation_covers_what_package_uses() -> None:
    assert wire_type(int | None) == "int | nil"
    assert wire_type(dict[str, Any] | None) == "map[str, any] | nil"
    assert wire_type(list[package.KvItem]) == "list[KvItem]"
    assert wire_type(typing.Annotated[int, msgspec.Meta(ge=0)]) == "int"
    with pytest.raises(AssertionError):
        wire_type(set[int])


# ---- the numbers in prose are the code's ------------------------------------------------------


def spaced(number: int) -> str:
    """1048576 -> '1 048 576', as the document writes large numbers."""
    return f"{number:,}".replace(",", " ")


DEFAULTS = config.Settings()


@pytest.mark.parametrize(
    "statement",
    [
        f"{protocol.HEADER_SIZE}-byte header",
        f"`{protocol.HEADER.format}`",
        "`" + " ".join(f"0x{byte:02x}" for byte in protocol.MAGIC) + "` (ASCII `PY`)",
        f"| version        | `{protocol.PROTOCOL_VERSION}` |",
        f"bit {protocol.FLAG_COMPRESSED.bit_length() - 1} `COMPRESSED`",
        f"default {protocol.DEFAULT_MAX_FRAME_SIZE >> 20} MiB = "
        f"{spaced(protocol.DEFAULT_MAX_FRAME_SIZE)} bytes",
        f"server default {protocol.DEFAULT_COMPRESSION_THRESHOLD // 1024} KiB",
        f"default port **{DEFAULTS.port}**",
        f"`REQUEST_TIMEOUT` (default {DEFAULTS.request_timeout:g} s)",
        f"`MAX_REQUEST_TIMEOUT`** (default {DEFAULTS.max_request_timeout:g} s)",
        f"`IDLE_TIMEOUT` seconds (default {DEFAULTS.idle_timeout:g}, 0 = never)",
        f"`FRAME_TIMEOUT` (default {DEFAULTS.frame_timeout:g})",
        f"`TLS_HANDSHAKE_TIMEOUT` (default {DEFAULTS.tls_handshake_timeout:g})",
        f"`MAX_IN_FLIGHT` requests running (default {DEFAULTS.max_in_flight})",
        f"`SHUTDOWN_TIMEOUT` seconds (default {DEFAULTS.shutdown_timeout:g})",
        f"`key`: 1 to {actions.MAX_KEY_BYTES} bytes in UTF-8",
        f"| `key` | `str` | required | 1 to {actions.MAX_KEY_BYTES} UTF-8 bytes |",
        f"`value`: at most {actions.MAX_VALUE_BYTES // (1024 * 1024)} MiB = "
        f"{spaced(actions.MAX_VALUE_BYTES)} bytes",
        f"at most {spaced(actions.MAX_VALUE_BYTES)} bytes |",
        f"1 to {actions.MAX_LIST_LIMIT}, else `INVALID_ARGUMENT`",
        f"after {database.RETRY_ATTEMPTS} attempts",
        f"`CONFLICT` (code {ErrorCode.CONFLICT.value})",
        "signed 64-bit: -2⁶³ to 2⁶³-1",
        f"({-(2**63):,} to {2**63 - 1:,})".replace(",", " "),
    ],
)
def test_numbers_in_the_document_are_the_codes(statement: str) -> None:
    assert " ".join(statement.split()) in " ".join(DOC.split())  # however the prose is wrapped


# ---- the worked examples decode to what the document says -------------------------------------

EXAMPLES = list(EXAMPLE.finditer(DOC))


def test_every_hex_block_is_a_checked_example() -> None:
    assert EXAMPLES and len(EXAMPLES) == DOC.count("```hex")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda m: f"{m['name']}-{m['request_id']}")
def test_hex_example_decodes_to_what_the_document_says(example: re.Match[str]) -> None:
    data = bytes.fromhex(example["hex"])
    kind = PACKAGE(int(example["kind"]))
    expected = ast.literal_eval(example["body"])
    decoder = FrameDecoder()
    for offset in range(len(data)):  # byte by byte: a reader may get any split
        decoder.feed(data[offset : offset + 1])
        frame = decoder.next_frame()
        assert (frame is None) == (offset < len(data) - 1)
    assert frame is not None and decoder.buffered == 0
    assert (kind.name, frame.kind) == (example["name"], kind.value)
    assert frame.request_id == int(example["request_id"])
    assert frame.timeout_ms == int(example["timeout_ms"])
    assert data[3] == int(example["flags"])
    assert msgspec.msgpack.decode(frame.body) == expected  # the keys on the wire, exactly
    body = package.unpack(kind, frame.body)
    assert body == body_type(kind)(**expected)
    if not int(example["flags"]):  # what the reference implementation sends, byte for byte
        assert encode_frame(kind, frame.request_id, package.pack(kind, body),
                            timeout_ms=frame.timeout_ms) == data  # fmt: skip


def test_the_byte_by_byte_table_spells_the_first_example() -> None:
    text = section("### A request and its answer, byte by byte")
    cells = re.findall(r"^\| `([0-9a-f ]+)` \|", text, re.MULTILINE)
    assert bytes.fromhex(" ".join(cells)) == bytes.fromhex(EXAMPLES[0]["hex"])


def test_examples_are_well_formed_bodies() -> None:
    kinds = {PACKAGE(int(example["kind"])) for example in EXAMPLES}
    assert {PACKAGE.ANSWER_ERROR, PACKAGE.REQUEST_KV_PUT, PACKAGE.ANSWER_KV_PUT} <= kinds
    assert any(int(example["flags"]) & protocol.FLAG_COMPRESSED for example in EXAMPLES)
