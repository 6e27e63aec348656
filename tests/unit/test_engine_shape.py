"""The engine's core and wire layers keep their functions short (under ~60
lines, the project's rule), so each phase reads as one screen."""

import pathlib
import re

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "nova_bhyve" / "native" / "src"
LIMIT = 60
HEADER = re.compile(r"^[A-Za-z_][\w \t\*]*?\b(\w+)\s*\(")


def functions(path):
    """(name, first line, lines) of each function defined in a C file:
    a header at column 0, its body closed by a "}" at column 0."""
    start = name = None
    for i, line in enumerate(path.read_text().splitlines()):
        if start is None:
            m = HEADER.match(line)
            if m and not line.rstrip().endswith(";") and not line.startswith("#"):
                start, name = i, m.group(1)
        elif line == "}":
            yield name, start + 1, i - start + 1
            start = None
        elif i == start + 1 and line.rstrip().endswith(";"):
            start = None        # a prototype over two lines


@pytest.mark.parametrize("layer", ["core", "wire"])
def test_no_function_in_the_engine_core_is_over_60_lines(layer):
    long = [f"{path.relative_to(SRC)}:{line} {name} ({n} lines)"
            for path in sorted((SRC / layer).glob("*.c"))
            for name, line, n in functions(path) if n > LIMIT]
    assert not long, long


def test_the_counter_sees_the_functions_it_measures():
    found = {name for name, _, _ in functions(SRC / "core" / "dest.c")}
    assert {"dest_finish", "join_channels", "wait_rounds"} <= found, found
