"""Run the whole test suite N times in a row and count the runs that failed (issue 16: no
failure in 20 runs on a loaded 2-core machine).

    python tests/repeat_suite.py --times 20                 # the whole suite, 20 times
    python tests/repeat_suite.py --times 5 -- tests/test_hardening.py -x
    python tests/repeat_suite.py --repo /tmp/wt --record runs.jsonl --times 10   # a series in parts

Each run is ``python -m pytest -q`` (plus the arguments after ``--``) in a fresh process from the
repository root (``--repo``: another checkout, e.g. a worktree at a fixed commit), offline; a
failing or hung run never stops the loop. One JSON line per run (commit, exit code, counts,
seconds, the failing tests), then ``{"runs": N, "failures": F, "timeouts": T}`` (a run killed at
``--timeout`` is counted apart: hung, or starved of the cores by a heavier load); the exit code
is 1 unless every run passed. ``--record FILE`` also appends each run's line to FILE, so a series too long for one
sitting continues later at the same commit; the summary then adds the recorded runs and failures
at that commit. To run it beside a load, start the load first, for example::

    python benchmarks/engine.py --workspace workspaces/mams-demo --queries 1000 &
    python tests/repeat_suite.py --times 20

Not a test module (pytest collects ``test_*.py`` only), so the suite never runs itself.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b")
FAILING = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def summarize(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``3 failed, 200 passed in 12.3s``)."""
    lines = [line for line in output.splitlines() if COUNTS.search(line) and " in " in line]
    if not lines:
        return {}
    return {"error" if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(lines[-1])}


def commit_of(repo: Path) -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,  # noqa: E731
                                       check=False).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def outcome(exit_code: int | str) -> str:
    """``passed``, ``failed`` (pytest's exit code was not 0) or ``timeout`` (killed at --timeout:
    hung, or starved of the cores past the limit; a run's output cannot tell which)."""
    return "timeout" if exit_code == "timeout" else "passed" if exit_code == 0 else "failed"


def recorded(path: Path, commit: str) -> dict[str, int]:
    """Runs, failed runs and timed-out runs recorded in ``path`` at ``commit``."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    mine = [outcome(r.get("exit_code")) for r in runs if r.get("commit") == commit]
    return {"recorded_runs": len(mine), "recorded_failures": mine.count("failed"), "recorded_timeouts": mine.count("timeout")}


def run_once(number: int, pytest_args: list[str], timeout: float, log_dir: Path | None, repo: Path = ROOT) -> dict:
    """One run of the suite in ``repo``: its commit, exit code, counts, seconds and failing tests."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    commit = commit_of(repo)
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", *pytest_args], cwd=repo, env=env, check=False,
                              capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # its output is bytes, whatever ``text`` says
        code, output = "timeout", (err.stdout or b"").decode(errors="replace")
    if log_dir is not None:
        (log_dir / f"run-{number:03d}.log").write_text(output)
    return {"run": number, "commit": commit, "exit_code": code, **summarize(output),
            "seconds": round(time.perf_counter() - started, 1),
            "failing": [name for _, name in FAILING.findall(output)][:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=20, help="how many runs (default 20)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run counts as hung (default 3600)")
    parser.add_argument("--log-dir", type=Path, help="keep each run's pytest output here (run-NNN.log)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="the checkout to test (default: this one)")
    parser.add_argument("--record", type=Path, help="append each run's JSON line to this file")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest, after --")
    args = parser.parse_args(argv)
    if args.times < 1:
        parser.error("--times must be at least 1")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for number in range(1, args.times + 1):
        result = run_once(number, args.pytest_args, args.timeout, args.log_dir, args.repo)
        outcomes.append(outcome(result["exit_code"]))
        print(json.dumps(result), flush=True)
        if args.record is not None:
            with args.record.open("a") as out:
                out.write(json.dumps(result) + "\n")
    summary = {"runs": args.times, "failures": outcomes.count("failed"), "timeouts": outcomes.count("timeout")}
    if args.record is not None:
        summary |= {"commit": commit_of(args.repo), **recorded(args.record, commit_of(args.repo))}
    print(json.dumps(summary), flush=True)
    return 0 if outcomes.count("passed") == args.times else 1


if __name__ == "__main__":
    sys.exit(main())
