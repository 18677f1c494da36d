"""``make compare``: our W1 and W2 beside the best peer's, measured in one window.

This machine's speed drifts by up to 2x from hour to hour, so a figure of
ours only means something beside the peer's measured at the same time. Each
round runs ``make bench``'s W1 and W2 (``python -m bench.bench --no-w3``, with
the given ``--store``, ``--replicas`` and sizes), then the peer's on the same
sizes (``../shared/peers/run-restate.sh w1 N w2 M``: Restate, installed by
that script on its first run): ours, theirs, ours, theirs... It prints each
round as it ends, then the medians and their ratios:

- W1, workflows/s, ours / theirs (more is better: PERFORMANCE.md's target on
  PostgreSQL with one server is at least 1.35);
- W2 p50, ours / theirs (less is better: at most 0.7).

One JSON line on stdout holds every round (ours: the bench's whole JSON
line); the summary goes to stderr.

    make compare COMPARE_ARGS="--store postgres --rounds 5"
    python -m bench.compare --rounds 1 --n 200 --m 30     # does it run?
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "run-restate.sh"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="W1 and W2 of make bench, interleaved with the best peer's (Restate); "
        "the ratio of medians.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ours then theirs (3)")
    parser.add_argument("--n", type=int, default=2000, help="W1: workflows at once (2000)")
    parser.add_argument("--m", type=int, default=200, help="W2: workflows one at a time (200)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--replicas", type=int, default=1, help="ours: servers (with postgres)")
    parser.add_argument(
        "--bench-args",
        default="",
        help='more arguments for our bench, in one string (e.g. "--lease-period 5")',
    )
    parser.add_argument("--peer", type=Path, default=PEER, help=f"the peer's script ({PEER})")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds for each run of either side"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.m < 1 or args.replicas < 1:
        parser.error("--rounds, --n, --m and --replicas must be at least 1")
    return args


def _run(command: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return -1, out, f"timed out after {timeout:g} s"
    return done.returncode, done.stdout, done.stderr


def ours(args: argparse.Namespace) -> dict[str, Any]:
    """One run of our bench: its W1 workflows/s and W2 p50, and its whole report."""
    command = [
        sys.executable, "-m", "bench.bench", "--no-w3", "--n", str(args.n), "--m", str(args.m),
        "--store", args.store, "--replicas", str(args.replicas), *args.bench_args.split(),
    ]  # fmt: skip
    code, out, err = _run(command, args.timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"bench exited with {code}: {err.strip()[-600:]}"}
    report: dict[str, Any] = json.loads(lines[-1])
    result = {
        "w1_wf_per_s": report["w1"]["workflows_per_s"],
        "w2_p50_ms": report["w2"]["p50_ms"],
        "report": report,
    }
    # The other ways to follow a workflow, and HTTP/JSON (Connect), when the bench ran them.
    for key, phase, figure in (
        ("w1_run_wf_per_s", "w1_run", "workflows_per_s"),
        ("w1_watch_many_wf_per_s", "w1_watch_many", "workflows_per_s"),
        ("w1_server_cpu_ms_per_wf", "w1", "server_cpu_ms_per_wf"),
        ("w2_create_wait_p50_ms", "w2_create_wait", "p50_ms"),
        ("w1_http_wf_per_s", "w1_http", "workflows_per_s"),
        ("w1_http2_wf_per_s", "w1_http2", "workflows_per_s"),
        ("w2_http_p50_ms", "w2_http", "p50_ms"),
    ):
        if phase in report:
            result[key] = report[phase][figure]
    if code != 0:
        result["error"] = f"bench exited with {code} (failures or cuts: see its report)"
    return result


def theirs(args: argparse.Namespace) -> dict[str, Any]:
    """One run of the peer's script on the same sizes."""
    if not args.peer.is_file():
        return {"error": f"no peer script at {args.peer}"}
    command = ["bash", str(args.peer), "w1", str(args.n), "w2", str(args.m)]
    code, out, err = _run(command, args.timeout)
    result: dict[str, Any] = {"lines": []}
    errors = []
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        result["lines"].append(record)
        if "error" in record:
            errors.append(record["error"])
        elif record.get("bench") == "W1":
            result["w1_wf_per_s"] = record.get("wf_per_s")
        elif record.get("bench") == "W2":
            result["w2_p50_ms"] = record.get("p50_ms")
    if code != 0:
        errors.append(f"exited with {code}: {err.strip()[-600:]}")
    if errors:
        result["error"] = "; ".join(errors)
    return result


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds: list[dict[str, Any]] = []
    started = time.time()
    for number in range(1, args.rounds + 1):
        mine = ours(args)
        http = (
            f"; over HTTP/JSON W1 {mine['w1_http_wf_per_s']} wf/s (HTTP/2 "
            f"{mine.get('w1_http2_wf_per_s')}), W2 p50 {mine.get('w2_http_p50_ms')} ms"
            if "w1_http_wf_per_s" in mine
            else ""
        )
        print(
            f"round {number} ours ({args.store}, {args.replicas} server(s)): "
            f"W1 {mine.get('w1_wf_per_s')} wf/s, W2 p50 {mine.get('w2_p50_ms')} ms{http}"
            + (f"  [{mine['error']}]" if "error" in mine else ""),
            file=sys.stderr,
            flush=True,
        )
        peer = theirs(args)
        print(
            f"round {number} theirs (Restate): W1 {peer.get('w1_wf_per_s')} wf/s, "
            f"W2 p50 {peer.get('w2_p50_ms')} ms"
            + (f"  [{peer['error']}]" if "error" in peer else ""),
            file=sys.stderr,
            flush=True,
        )
        rounds.append({"ours": mine, "theirs": peer, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    keys = (
        "w1_wf_per_s",
        "w2_p50_ms",
        "w1_run_wf_per_s",
        "w1_watch_many_wf_per_s",
        "w1_server_cpu_ms_per_wf",
        "w2_create_wait_p50_ms",
        "w1_http_wf_per_s",
        "w1_http2_wf_per_s",
        "w2_http_p50_ms",
    )
    medians = {
        side: {
            key: _median([r[side].get(key) for r in rounds])
            for key in keys
            if any(key in r[side] for r in rounds)
        }
        for side in ("ours", "theirs")
    }
    ratios = {
        "w1_wf_per_s_ours_over_theirs": _ratio(
            medians["ours"]["w1_wf_per_s"], medians["theirs"]["w1_wf_per_s"]
        ),
        "w2_p50_ours_over_theirs": _ratio(
            medians["ours"].get("w2_p50_ms"), medians["theirs"].get("w2_p50_ms")
        ),
    }
    if "w1_run_wf_per_s" in medians["ours"]:
        ratios["w1_run_over_theirs"] = _ratio(
            medians["ours"]["w1_run_wf_per_s"], medians["theirs"].get("w1_wf_per_s")
        )
    if "w2_create_wait_p50_ms" in medians["ours"]:
        ratios["w2_create_wait_p50_over_theirs"] = _ratio(
            medians["ours"]["w2_create_wait_p50_ms"], medians["theirs"].get("w2_p50_ms")
        )
    if "w1_http_wf_per_s" in medians["ours"]:
        # Each round's HTTP W1 against its own gRPC W1 (the same server, minutes
        # apart), then the median: the drift between rounds cancels out.
        ratios["w1_http_over_grpc"] = _median(
            [
                _ratio(r["ours"].get("w1_http_wf_per_s"), r["ours"].get("w1_wf_per_s"))
                for r in rounds
            ]
        )
        ratios["w1_http2_over_grpc"] = _median(
            [
                _ratio(r["ours"].get("w1_http2_wf_per_s"), r["ours"].get("w1_wf_per_s"))
                for r in rounds
            ]
        )
        ratios["w1_http_over_theirs"] = _ratio(
            medians["ours"]["w1_http_wf_per_s"], medians["theirs"].get("w1_wf_per_s")
        )
    report = {
        "bench": "cruzflow-vs-restate",
        "store": args.store,
        "replicas": args.replicas,
        "n": args.n,
        "m": args.m,
        "rounds": rounds,
        "medians": medians,
        "ratios": ratios,
        "total_s": round(time.time() - started, 1),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    o, t = medians["ours"], medians["theirs"]
    print(
        f"medians of {args.rounds} round(s): W1 ours {o.get('w1_wf_per_s')} / theirs "
        f"{t.get('w1_wf_per_s')} wf/s = {ratios['w1_wf_per_s_ours_over_theirs']}x; W2 p50 ours "
        f"{o.get('w2_p50_ms')} / theirs {t.get('w2_p50_ms')} ms = "
        f"{ratios['w2_p50_ours_over_theirs']}x",
        file=sys.stderr,
    )
    if "w1_http_over_grpc" in ratios:
        print(
            f"over HTTP/JSON: W1 {o['w1_http_wf_per_s']} wf/s = {ratios['w1_http_over_grpc']} of "
            f"gRPC's (HTTP/2: {ratios['w1_http2_over_grpc']}), "
            f"{ratios['w1_http_over_theirs']}x Restate's; W2 p50 {o.get('w2_http_p50_ms')} ms",
            file=sys.stderr,
        )
    failed = any("error" in r["ours"] or "error" in r["theirs"] for r in rounds)
    return 1 if failed or None in ratios.values() else 0


if __name__ == "__main__":
    sys.exit(main())
