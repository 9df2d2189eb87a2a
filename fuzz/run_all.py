"""Run every fuzz/fuzz_*.py harness for a fixed time or number of executions.

    python fuzz/run_all.py --seconds 30              # CI: 30 s shared by all harnesses
    python fuzz/run_all.py --runs 1000000 --only safetensors

Each harness runs in its own process with its seed corpus (fuzz/corpus/NAME, written by
``--make-corpus`` when absent), its dictionary (fuzz/NAME.dict) and limits (``-timeout``
per input, ``-rss_limit_mb``, ``-malloc_limit_mb``: an allocation from an unchecked size
in a file is a finding). New inputs go to a scratch corpus, not the repository.
Findings are written to fuzz/findings/NAME-*. Exit status: 0 when no harness found
anything, 1 otherwise. The last ``cov:`` line of each harness is printed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent


def harnesses() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


def run_one(name: str, seconds: float | None, runs: int | None, work: Path) -> tuple[int, str]:
    script = FUZZ_DIR / f"fuzz_{name}.py"
    corpus = FUZZ_DIR / "corpus" / name
    if not corpus.is_dir() or not any(corpus.iterdir()):
        subprocess.run([sys.executable, str(script), "--make-corpus"], check=True)
    scratch = work / name
    scratch.mkdir(parents=True, exist_ok=True)
    findings = FUZZ_DIR / "findings"
    findings.mkdir(exist_ok=True)
    args = [
        sys.executable,
        str(script),
        str(scratch),
        str(corpus),
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-malloc_limit_mb=1024",
        f"-artifact_prefix={findings}/{name}-",
        "-print_final_stats=1",
    ]
    d = FUZZ_DIR / f"{name}.dict"
    if d.is_file():
        args.append(f"-dict={d}")
    if seconds is not None:
        args.append(f"-max_total_time={max(1, int(seconds))}")
    if runs is not None:
        args.append(f"-runs={runs}")
    p = subprocess.run(args, capture_output=True, text=True)
    out = p.stdout + p.stderr
    cov = [ln for ln in out.splitlines() if re.match(r"#\d+\s+(DONE|pulse|NEW|REDUCE|INITED)", ln)]
    stats = [ln for ln in out.splitlines() if ln.startswith("stat::")]
    summary = "\n".join([*(cov[-1:] or ["(no coverage line)"]), *stats])
    if p.returncode != 0:
        tail = "\n".join(out.splitlines()[-40:])
        summary += f"\n--- {name}: exit {p.returncode}\n{tail}"
    return p.returncode, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, help="total time, shared equally by harnesses")
    ap.add_argument("--runs", type=int, help="executions per harness")
    ap.add_argument("--only", action="append", help="harness name (repeatable)")
    args = ap.parse_args(argv)
    names = args.only or harnesses()
    unknown = sorted(set(names) - set(harnesses()))
    if unknown:
        ap.error(f"no harness {unknown}; have {harnesses()}")
    if args.seconds is None and args.runs is None:
        args.seconds = 30.0
    each = None if args.seconds is None else args.seconds / len(names)
    failed = []
    with tempfile.TemporaryDirectory(prefix="qlinear-fuzz-corpus-") as work:
        for name in names:
            code, summary = run_one(name, each, args.runs, Path(work))
            print(f"== {name}: {'ok' if code == 0 else 'FINDING'}\n{summary}", flush=True)
            if code != 0:
                failed.append(name)
    if failed:
        print(f"fuzz findings in {failed}; inputs in {FUZZ_DIR / 'findings'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
