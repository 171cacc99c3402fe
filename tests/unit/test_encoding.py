import json
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from libvms import encoding
from libvms.errors import EncodingError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_canonical_roundtrips_and_is_stable(value):
    data = encoding.canonical(value)
    parsed = encoding.parse_canonical(data)
    assert encoding.canonical(parsed) == data


non_float_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(non_float_values)
def test_fast_path_spells_exactly_what_rfc8785_spells(value):
    import rfc8785

    assert encoding.canonical(value) == rfc8785.dumps(value)


@given(st.dictionaries(st.text(max_size=5), st.integers(0, 100), min_size=2, max_size=6))
def test_key_order_does_not_change_bytes(d):
    reordered = dict(reversed(list(d.items())))
    assert encoding.canonical(d) == encoding.canonical(reordered)


def test_non_bmp_keys_sort_by_utf16_code_units():
    # U+10000 is D800 DC00 in UTF-16, which sorts before U+FFFF; by code point it is after.
    assert encoding.canonical({"\U00010000": 1, "\uffff": 2}) == (
        '{"\U00010000":1,"\uffff":2}'.encode()
    )


def test_lone_surrogates_are_rejected():
    with pytest.raises(EncodingError):
        encoding.canonical({"a": "\ud800"})


def test_rfc8785_known_spelling():
    assert encoding.canonical({"b": 1, "a": [1.5, "x", None, True, 1e21, -0.0]}) == (
        b'{"a":[1.5,"x",null,true,1e+21,0],"b":1}'
    )


@pytest.mark.parametrize(
    "bad",
    [
        math.nan,
        math.inf,
        -math.inf,
        b"bytes",
        {1: "non-string key"},
        2**60,
        {"set": {1, 2}},
        object(),
    ],
)
def test_rejects_values_json_cannot_carry(bad):
    with pytest.raises(EncodingError):
        encoding.canonical(bad)


def test_rejects_deep_nesting_but_accepts_the_bound():
    ok = []
    for _ in range(encoding.MAX_DEPTH - 1):
        ok = [ok]
    encoding.canonical(ok)
    too_deep = [ok]
    for _ in range(2):
        too_deep = [too_deep]
    with pytest.raises(EncodingError, match="nested deeper"):
        encoding.canonical(too_deep)


def test_rejects_oversize():
    with pytest.raises(EncodingError, match="more than"):
        encoding.canonical({"x": "a" * 100}, max_bytes=50)


@pytest.mark.parametrize(
    "text",
    [
        b"NaN",
        b'{"a":Infinity}',
        b'{"a":1,"a":2}',
        b"{",
        b"[1,]",
        "[" * 1000 + "]" * 1000,
        # Numbers beyond a double's range: an exponent, or an integer of 400 digits.
        "[1e400]",
        '{"a":-1e999}',
        "1" + "0" * 400,
        "[-" + "9" * 400 + "]",
    ],
)
def test_parse_rejects_invalid_json(text):
    with pytest.raises(EncodingError):
        encoding.parse(text)


def test_parse_bounds_nesting_whatever_the_strings_hold():
    deepest = "[" * encoding.MAX_DEPTH + "]" * encoding.MAX_DEPTH
    assert encoding.parse(deepest) is not None
    with pytest.raises(EncodingError, match="nested deeper"):
        encoding.parse("[" + deepest + "]")
    with pytest.raises(EncodingError, match="nested deeper"):
        encoding.parse('{"a":' * (encoding.MAX_DEPTH + 1) + "1" + "}" * (encoding.MAX_DEPTH + 1))
    # Brackets inside strings are only characters.
    text = json.dumps({"a": "[{" * 100, "b": [["x"]]})
    assert encoding.parse(text) == {"a": "[{" * 100, "b": [["x"]]}


def test_parse_canonical_rejects_other_spellings():
    with pytest.raises(EncodingError, match="canonical"):
        encoding.parse_canonical(b'{"b":1,"a":2}')
    with pytest.raises(EncodingError, match="canonical"):
        encoding.parse_canonical(b'{"a": 2}')


@given(json_values)
def test_parse_canonical_accepts_exactly_the_canonical_spelling(value):
    try:
        data = encoding.canonical(value)
    except EncodingError:
        return  # a lone surrogate in the drawn text
    assert encoding.same_value(encoding.parse_canonical(data), value)
    # Python's own sorted, compact spelling differs in floats (1.0, 1e-07) and in
    # the order of keys beyond the Basic Multilingual Plane: accepted only where equal.
    plain = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if plain.encode() == data:
        assert encoding.same_value(encoding.parse_canonical(plain.encode()), value)
    else:
        with pytest.raises(EncodingError, match="canonical"):
            encoding.parse_canonical(plain.encode())


@given(json_values)
@example([1e16, {"t": -(2.0**60)}, 2.0**53, 9007199254740991, 1e21, 123456789012345.0])
def test_parse_verified_reads_back_the_value_canonical_wrote(value):
    try:
        data = encoding.canonical(value)
    except EncodingError:
        return  # a lone surrogate in the drawn text
    parsed = encoding.parse_verified(data)
    assert encoding.canonical(parsed) == data
    assert encoding.same_value(parsed, value)


def test_may_hold_unsafe_int_looks_for_sixteen_digits_in_a_row():
    assert not encoding.may_hold_unsafe_int(b"[900719925474099]")
    assert encoding.may_hold_unsafe_int(b"[9007199254740993]")
    assert encoding.may_hold_unsafe_int(b'["1234567890123456"]')  # a string: harmless
    assert not encoding.may_hold_unsafe_int(b"[1e+21,12345678,12345678]")


def _map_scalars(value, fn):
    if isinstance(value, dict):
        return {k: _map_scalars(v, fn) for k, v in reversed(list(value.items()))}
    if isinstance(value, list):
        return [_map_scalars(v, fn) for v in value]
    return fn(value)


def _ints_as_floats(x):
    return float(x) if type(x) is int else x


def _bools_as_ints(x):
    return int(x) if type(x) is bool else x


@given(json_values, json_values)
def test_same_value_agrees_with_canonical_bytes(a, b):
    assert encoding.same_value(a, b) == (encoding.canonical(a) == encoding.canonical(b))


@given(json_values)
def test_same_value_sees_through_key_order_and_number_types_but_not_bools(value):
    assert encoding.same_value(value, encoding.parse(encoding.canonical(value)))
    twin = _map_scalars(value, _ints_as_floats)  # also reverses every object's key order
    assert encoding.canonical(twin) == encoding.canonical(value)
    assert encoding.same_value(value, twin)
    forged = _map_scalars(value, _bools_as_ints)
    differs = encoding.canonical(forged) != encoding.canonical(value)
    assert encoding.same_value(value, forged) == (not differs)
    assert encoding.same_value(forged, value) == (not differs)


def test_same_value_tells_true_from_one():
    assert not encoding.same_value({"res": True}, {"res": 1})
    assert not encoding.same_value([0], [False])
    assert encoding.same_value({"a": [1, 2.0]}, {"a": [1.0, 2]})


@given(json_values)
def test_canonical_checked_with_check_values_answer_is_canonical(value):
    assert encoding.canonical_checked(value, encoding.check_value(value)) == encoding.canonical(
        value
    )
