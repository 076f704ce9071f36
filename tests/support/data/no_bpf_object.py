"""The daemon as on a machine without the BPF object (test_engine_bpf: auto's fallback).

A real daemon and mount; only the loader is told the object is elsewhere."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tracker.backends.bpf import loader  # noqa: E402

loader.OBJECT = Path("/nonexistent/restrack.bpf.o")

from restrackfs.daemon import main  # noqa: E402

main()
