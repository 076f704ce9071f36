"""restrackfs with a counter on every request handler, for the request-count pass.

`python -m bench.countingd DAEMON-ARGS...` runs the ordinary daemon
(`restrackfs.daemon.main`) after wrapping each pyfuse3 handler of
`RestrackOperations` with a counter. On SIGUSR1 it writes the counts so far,
as JSON `{"seq": N, "counts": {"lookup": ..., "read": ...}}`, to the file named
by $RESTRACK_BENCH_COUNTS. Only the request-count pass uses it: the timed
benchmarks run the daemon unwrapped.

These are the requests that reach the daemon's Python code, which is what a
read costs; requests the kernel answers from its caches never get there.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
from collections import Counter
from typing import Any

from restrackfs import daemon
from restrackfs.fs import RestrackOperations

NOT_REQUESTS = {"init", "stacktrace"}
counts: Counter[str] = Counter()
_seq = 0


def _wrap(name: str, handler: Any) -> Any:
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def counted_async(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return await handler(*args, **kwargs)

        return counted_async

    @functools.wraps(handler)
    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return handler(*args, **kwargs)

    return counted


def install() -> None:
    import pyfuse3

    for name in dir(pyfuse3.Operations):
        if name.startswith("_") or name in NOT_REQUESTS:
            continue
        handler = getattr(RestrackOperations, name, None)
        if callable(handler):
            setattr(RestrackOperations, name, _wrap(name, handler))


def _dump(signum: int, frame: object) -> None:
    global _seq
    _seq += 1
    path = os.environ["RESTRACK_BENCH_COUNTS"]
    temp = f"{path}.tmp"
    with open(temp, "w") as file:
        json.dump({"seq": _seq, "counts": dict(counts)}, file)
    os.replace(temp, path)


def main() -> None:
    install()
    signal.signal(signal.SIGUSR1, _dump)
    daemon.main(sys.argv[1:])


if __name__ == "__main__":
    main()
