"""The simulator's XML-RPC encoder against Python's own XML-RPC parser, on generated values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from xobackup_hypervisor_xcpng.sim.codec import DateTime, parse_value_fragment, xml_value
from xobackup_hypervisor_xcpng.sim.where import compile_filter

# XML 1.0 cannot carry most control characters: XAPI's strings never hold them either
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n"))
scalars = (
    text
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.builds(lambda n: DateTime(f"2024{n:04d}T12:00:00Z"), st.integers(101, 1231))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


def as_xapi_client_sees_it(value):
    """What a client reads back: ints are untyped strings, doubles have 16 digits (§1.2)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return float(f"{value:.16g}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return [as_xapi_client_sees_it(v) for v in value]
    if isinstance(value, dict):
        return {k: as_xapi_client_sees_it(v) for k, v in value.items()}
    return value


@given(values)
def test_encoded_values_parse_back(value):
    decoded = parse_value_fragment(xml_value(value))
    expected = as_xapi_client_sees_it(value)
    if isinstance(value, str) and "\r" in value:
        return  # XML parsers normalise CR line ends; XAPI's strings do not carry them
    assert decoded == expected


def test_filter_language():
    record = {"name_label": 'say "hi"', "is_a_template": False, "power_state": "Halted"}
    assert compile_filter('field "name__label" = "say \\"hi\\""')(record)
    assert compile_filter('not (field "is_a_template"="true") and true')(record)
    assert not compile_filter('field "power_state"="Running" or false')(record)
    assert compile_filter("")(record)
