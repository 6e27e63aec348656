"""PROTOCOL.md and wire/wire.h describe the same frames."""

import re

from .conftest import NATIVE

SRC = NATIVE / "src"


def test_protocol_md_lists_exactly_the_frames_the_wire_layer_knows():
    header = (SRC / "wire" / "wire.h").read_text()
    enum = re.search(r"enum nb_msg \{(.*?)\};", header, re.S).group(1)
    known = {(int(v), n) for n, v in re.findall(r"NB_MSG_(\w+) = (\d+)", enum)}
    spec = (SRC / "PROTOCOL.md").read_text()
    listed = {(int(v), n) for v, n in
              re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", spec, re.M)
              if n not in ("ZERO", "RAW", "DELTA", "ZSTD")}
    assert known == listed


def test_no_frame_bytes_outside_the_wire_layer():
    """The engine core exchanges typed messages: no byte-level encoding."""
    for path in (SRC / "core").glob("*.c"):
        if path.name == "codec.c":      # page contents, not frames
            continue
        text = path.read_text()
        assert not re.search(r"\bnb_(put|get)(16|32|64)\(", text), path.name
