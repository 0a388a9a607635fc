"""Fault injection at scale: SIGKILL each long-running command at N random moments, rerun it, count what broke.

    .venv/bin/python benchmarks/fault_injection.py --kills 10 [--commands compose,bbh] [--seed 0] [--json FILE]

For each command (compose --out, hub build, bbh, train) on tiny inputs (tests/faults.py): one uninterrupted run
(its wall time T), then N trials, each in a fresh folder: start, SIGKILL after a delay drawn uniformly in [0, T),
rerun to the end, check. Prints per command: kills survived, duplicates, partial outputs, unparsable files,
mismatches with the uninterrupted run, failed reruns. Exit status 1 if anything was found. The same checks run
in CI with 2 kills per command (tests/test_faults.py); docs/design.md ("Guarantees") records a run of this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import faults  # noqa: E402  (tests/faults.py: the inputs, the commands and the checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per command (default: 10)")
    parser.add_argument("--commands", default="compose,hub build,bbh,train", help="comma-separated commands")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--json", help="also write the counts (and any findings) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorahub-faults-"))
    t0 = time.time()
    try:
        inputs = faults.make_inputs(work / "inputs")
        cmds = faults.commands(inputs)
        results = []
        for name in [c.strip() for c in args.commands.split(",") if c.strip()]:
            counts = faults.inject(cmds[name], work / name.replace(" ", "_"), args.kills, seed=args.seed)
            results.append(counts)
            print(f"{name:10s} T={counts.seconds:4.1f} s  kills {counts.kills:3d} ({counts.kills_at_work} after the "
                  f"lock was taken; +{counts.ended_before_kill} ended before the kill)  survived {counts.survived:3d}  duplicates {counts.duplicates}  partial "
                  f"{counts.partial}  unparsable {counts.unparsable}  mismatches {counts.mismatches}  failed reruns "
                  f"{counts.failed_reruns}", flush=True)
            for f in counts.findings:
                print("   ", f)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(c.duplicates + c.partial + c.unparsable + c.mismatches + c.failed_reruns for c in results)
    print(f"{sum(c.kills for c in results)} kills, {sum(c.survived for c in results)} survived, {total} findings "
          f"in {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"kills_per_command": args.kills, "seed": args.seed,
                                               "results": [c.as_dict() for c in results]}, indent=2) + "\n")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
