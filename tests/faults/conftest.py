"""The fault matrix drives the benchmarks' network namespaces
(benchmarks/vsqemu/netns.py).  The test command runs pytest with -P, so the
repository root is appended to the import path here: after site-packages,
so the installed nova_bhyve (with its compiled engine) still comes first."""

import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)
