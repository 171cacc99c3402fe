"""The two call forms the REPL reads (``libvms repl``)."""

import pytest

from libvms.cli import ReplSyntaxError, parse_repl_line


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("increment 2 x", ("increment", [2, "x"])),
        ('increment 2 "x y"', ("increment", [2, "x y"])),
        ("await client.increment(2, 'x')", ("increment", [2, "x"])),
        ("increment({a: 1}, [1, 2]);", ("increment", [{"a": 1}, [1, 2]])),
        ("increment 1;", ("increment", [1])),
        ("increment 1 ;", ("increment", [1])),
        ("increment 'a;b'", ("increment", ["a;b"])),
        ("increment 'a;'", ("increment", ["a;"])),  # a quoted ';' is the string's
    ],
)
def test_both_forms(line, parsed):
    assert parse_repl_line(line) == parsed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("increment(1,", "value is missing"),
        ("", "nothing to call"),
        ("1abc 2", "is not a method name"),
    ],
)
def test_refused_lines(line, message):
    with pytest.raises(ReplSyntaxError, match=message):
        parse_repl_line(line)
