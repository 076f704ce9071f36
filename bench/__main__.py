"""`python -m bench [--quick] [--out DIR] [--only NAME]...`: run the suite, write the report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import GROUPS
from bench.harness import ROOT, Config, build_helpers, work_dir
from bench.report import GroupResult, busy_share, machine, markdown, plot, table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark restrackfs; print a table and write benchmarks.md + .png.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (the smoke test; under a minute)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs",
        metavar="DIR",
        help="where benchmarks.md and benchmarks.png go (default docs/)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these groups (repeat or comma-separate): {', '.join(GROUPS)}",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw benchmarks.png")
    args = parser.parse_args(argv)
    names = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        parser.error(f"unknown group {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    args.groups = [name for name in GROUPS if not names or name in names]
    return args


def unwind_on_terminate() -> None:
    """SIGTERM or SIGHUP (a timeout, a closed terminal) unwinds the run as Ctrl-C
    does: every mount it made is unmounted and every daemon stopped on the way out.
    A second signal is ignored, so it cannot cut that cleanup short."""

    def stop(signum: int, _frame: object) -> None:
        for again in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(again, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unwind_on_terminate()
    if os.geteuid() != 0:
        print("bench: run as root (it mounts FUSE filesystems and lxcfs)", file=sys.stderr)
        return 2
    busy = busy_before_run()
    started = time.monotonic()
    results = run_groups(args.groups, quick=args.quick)
    seconds = time.monotonic() - started
    info = machine()
    info["busy before the run"] = f"{busy:.0%} of all cores (/proc/stat over 1 s)"
    args.out.mkdir(parents=True, exist_ok=True)
    plot_name, plot_note = draw_plot(args, results, info)
    text = markdown(
        results,
        info,
        quick=args.quick,
        plot=plot_name,
        plot_note=plot_note,
        argv=list(argv if argv is not None else sys.argv[1:]),
        seconds=seconds,
    )
    (args.out / "benchmarks.md").write_text(text)
    print_summary(args.out, results, plot_name, plot_note, seconds)
    return 1 if any(result.error for result in results) else 0


def busy_before_run() -> float:
    """The machine's busy share before the run, with a warning when others load it:
    every figure of the run would carry their load."""
    busy = busy_share()
    if busy > 0.15:
        print(
            f"bench: warning: the machine is already {busy:.0%} busy; the figures will show it",
            file=sys.stderr,
        )
    return busy


def run_groups(names: list[str], *, quick: bool) -> list[GroupResult]:
    """Each group in turn, in one work dir; a group that fails becomes a result with
    its error, so the others still run and the report says what went wrong."""
    results: list[GroupResult] = []
    with work_dir() as work:
        cfg = Config.quick_config(work) if quick else Config(work=work)
        helpers = build_helpers(work / "bin")
        for name in names:
            module = GROUPS[name]
            print(f"bench: {module.TITLE} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                result = module.run(cfg, helpers)
            except Exception as error:
                traceback.print_exc()
                result = GroupResult(name, module.TITLE, error=f"{type(error).__name__}: {error}")
            result.seconds = time.monotonic() - t0
            results.append(result)
            print(table([result]), flush=True)
    return results


def draw_plot(
    args: argparse.Namespace, results: list[GroupResult], info: dict[str, str]
) -> tuple[str | None, str]:
    """(the PNG's name for the report, or None; why there is no plot, or "")."""
    if args.no_plot:
        return None, "--no-plot"
    title = (
        f"restrackfs benchmarks, {info['date']} — {info['CPU']}, {info['cores (nproc)']}"
        f" cores, Linux {info['kernel']}" + (" (QUICK sizes)" if args.quick else "")
    )
    png = args.out / "benchmarks.png"
    plot_note = plot(results, png, title) or ""
    return (None if plot_note else png.name), plot_note


def print_summary(
    out: Path, results: list[GroupResult], plot_name: str | None, plot_note: str, seconds: float
) -> None:
    print("Goals:")
    for result in results:
        for goal in result.goals:
            print("  " + goal.line())
    if plot_note:
        print(f"plot: skipped ({plot_note})")
    png = out / "benchmarks.png"
    print(f"wrote {out / 'benchmarks.md'}" + (f" and {png}" if plot_name else ""))
    print(f"total {seconds:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
