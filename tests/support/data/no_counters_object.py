"""The daemon as on a kernel where counters.bpf.o cannot load (test_bpf_counters).

A real daemon and mount with the bpf engine; only the counter reader is told its
object is elsewhere, so heapsize must be read through /proc."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tracker.backends.bpf import counters  # noqa: E402

counters.OBJECT = Path("/nonexistent/counters.bpf.o")

from restrackfs.daemon import main  # noqa: E402

main()
