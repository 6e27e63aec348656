"""The engine's phase tables are the diagram drawn in PROTOCOL.md."""

import re

import pytest

from nova_bhyve.native.engine import Phase

from .conftest import NATIVE, selftest_module

ENDS = {Phase.FAILED, Phase.CANCELLED}
BEFORE_COMMIT = [Phase.SETUP, Phase.HANDSHAKE, Phase.PRECOPY, Phase.ITERATE,
                 Phase.SWITCHOVER, Phase.VERIFY]


def _diagram(is_source):
    """The transitions PROTOCOL.md draws for one side, as (from, to)."""
    text = (NATIVE / "src" / "PROTOCOL.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", text, re.S).group(1)
    edges = set()
    for a, b, label in re.findall(r"^\s*(\w+) --> (\w+)(?::\s*(.*))?$", block,
                                  re.M):
        if "source" in (label or "") and not is_source:
            continue
        edges.add((Phase[a], Phase[b]))
    edges |= {(p, e) for p in BEFORE_COMMIT for e in ENDS
              if is_source or p != Phase.ITERATE}
    return edges


@pytest.mark.parametrize("is_source", [1, 0])
def test_phase_table_is_the_protocol_diagram(is_source):
    lib = selftest_module()[1]
    legal = {(a, b) for a in Phase for b in Phase
             if lib.nb_selftest_phase_legal(is_source, a, b)}
    assert legal == _diagram(is_source)


def test_terminal_phases_lead_nowhere():
    lib = selftest_module()[1]
    for end in (Phase.DONE, Phase.FAILED, Phase.CANCELLED):
        for side in (0, 1):
            assert not any(lib.nb_selftest_phase_legal(side, end, p)
                           for p in Phase)
