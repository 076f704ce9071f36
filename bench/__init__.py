"""The benchmark suite of restrackfs: `scripts/bench`, or `python -m bench`.

Run from the checkout (it is not installed with the package). One module per
group; each has NAME, TITLE and `run(config, helpers) -> GroupResult`.
"""

from __future__ import annotations

from types import ModuleType

from bench import (
    enforcement,
    engines,
    exporter,
    latency,
    overhead,
    scale,
    throughput,
    trees,
    writes,
)

GROUPS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (
        latency,
        throughput,
        enforcement,
        overhead,
        scale,
        engines,
        writes,
        exporter,
        trees,
    )
}
