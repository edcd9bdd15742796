"""The record layout: one definition, and the C, numpy and Parquet views of it agree."""

from __future__ import annotations

import pytest

from probes.format import schema


def test_wire_record_has_no_holes_and_matches_dtype() -> None:
    rec = schema.WIRE_EVENT
    assert rec.dtype.itemsize == rec.size == 80
    assert all(rec.dtype.fields[name][1] == off for name, off in rec.offsets().items())


def test_c_header_declares_the_struct_with_offset_asserts() -> None:
    header = schema.c_header()
    for name, off in schema.WIRE_EVENT.offsets().items():
        assert f"offsetof(struct wire_event, {name}) == {off}" in header
    assert "sizeof(struct wire_event) == 80" in header


def test_tables_take_their_types_from_the_wire_record() -> None:
    wire = {f.name: f for f in schema.WIRE_EVENT.fields}
    for table in (schema.POSTS, schema.COMPLETIONS):
        for col in table.columns:
            assert col.wire in wire
    assert (
        schema.POSTS.arrow_schema().field("len").type
        == schema.COMPLETIONS.arrow_schema().field("ret").type
    )


def test_layout_refuses_implicit_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        schema.Record("bad", (schema.Field("a", "__u8"), schema.Field("b", "__u64")))


def test_no_payload_field() -> None:
    """Only integers cross from the kernel: no byte arrays, so no payload can be copied."""
    assert all(f.ctype.startswith(("__u", "__s")) for f in schema.WIRE_EVENT.fields)
