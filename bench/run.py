"""Run the benchmark suites: print a table per suite, write JSON per suite, print one JSON summary line last.

    python -m bench.run [--quick] [--headline] [--case TEXT] [--suite NAME ...] [--device cuda|cpu] [--out-dir DIR]
                        [--no-write]

A suite is any `bench/bench_<name>.py` defining SUITE = "<name>" and run(quick, device, ceilings, select) (see
bench/common.py). --quick uses tiny shapes so CI can smoke-run everything on a CPU in seconds; its numbers
mean nothing. --headline runs each suite's headline cases, providers and modes (bench/device_check.sh); --case
keeps the cases whose name contains the text. Results go to bench/results/<suite>_<device-slug>_<date>.json
unless --out-dir is given.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from bench import common

ORDER = ("grpo_loss", "fused_linear", "engine", "step")  # kernels first, then engine and whole steps


def available_suites() -> list[str]:
    """Suite names from the bench/bench_<name>.py files, in ORDER first, then alphabetically."""
    names = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def load_suite(name: str):
    """The suite's run function; a suite that fails to import becomes a function returning an error row."""
    try:
        module = importlib.import_module(f"bench.bench_{name}")
        return module.run
    except Exception as e:  # one broken suite must not hide the others' results
        return lambda quick, device, ceilings, select, e=e: [common.failed_row(name, "-", "-", "import", e)]


def _guarded(name: str, run):
    def guarded(quick, device, ceilings, select):
        try:
            return run(quick, device, ceilings, select)
        except Exception as e:  # a suite crashing mid-way is reported as an error row, the rest still run
            return [common.failed_row(name, "-", "-", "suite", e)]

    return guarded


def main(argv: list[str] | None = None) -> int:
    names = available_suites()
    parser = common.make_parser("run the grpo-fast benchmark suites")
    parser.add_argument("--suite", nargs="+", action="extend", choices=names, help="suites to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    selected = {n: _guarded(n, load_suite(n)) for n in (args.suite or names)}
    summary = common.run_suites(selected, args.quick, device, args.out_dir, not args.no_write, common.selection(args))
    common.emit_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
