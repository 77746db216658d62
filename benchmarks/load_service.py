"""Load test of the inspection service: N concurrent clients on loopback for T seconds.

Starts its own server (uvicorn in a subprocess, small seeded-random PatchCore profile on a
synthetic category) unless ``--url`` points at a running one. Each client loops: inspect one
image (POST /api/profiles/<p>/inspect), and every ``--history-every``-th request read a page
of history instead. Prints one flat row: requests/s, latency percentiles, errors (5xx apart),
peak RSS of the server process.

    python benchmarks/load_service.py                        # 50 clients, 60 s
    python benchmarks/load_service.py --clients 10 --seconds 10
    python benchmarks/load_service.py --url http://127.0.0.1:8000 --server-pid 1234 --token ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

PROFILE_FORM = {
    "method": "patchcore",
    "backbone": "resnet18",
    "weights": "random",
    "image_size": "64",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB from /proc (0, 0 when unavailable)."""
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ":" in line
        )
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _images(root: Path) -> dict[str, list[tuple[str, bytes]]]:
    from anomalens.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(
        root,
        categories=["washer"],
        n_train=6,
        n_test_good=4,
        n_test_defect=4,
        image_size=96,
        seed=0,
    )
    cat = root / "washer"
    normal = sorted((cat / "train" / "good").glob("*.png"))
    test = sorted((cat / "test").rglob("*.png"))
    return {
        "normal": [(p.name, p.read_bytes()) for p in normal],
        "test": [(f"{p.parent.name}_{p.name}", p.read_bytes()) for p in test],
    }


def _serve(port: int, data_dir: str) -> None:
    import uvicorn

    from anomalens.service import ServiceSettings, create_app

    settings = ServiceSettings(data_dir=Path(data_dir), port=port, torch_threads=1, workers=1)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning")


async def _client(
    http: httpx.AsyncClient,
    profile: str,
    images: list[tuple[str, bytes]],
    stop_at: float,
    history_every: int,
    lat: list[float],
    codes: list[int],
    offset: int,
) -> None:
    i = offset
    while time.perf_counter() < stop_at:
        i += 1
        t0 = time.perf_counter()
        try:
            if history_every and i % history_every == 0:
                r = await http.get("/api/results", params={"limit": 20})
            else:
                name, data = images[i % len(images)]
                r = await http.post(
                    f"/api/profiles/{profile}/inspect", files={"files": (name, data, "image/png")}
                )
            codes.append(r.status_code)
        except httpx.HTTPError:
            codes.append(-1)  # connection error / timeout
        lat.append(time.perf_counter() - t0)


async def _load(
    args: argparse.Namespace, url: str, images: list[tuple[str, bytes]], pid: int | None
) -> dict:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    lat: list[float] = []
    codes: list[int] = []
    peak_seen = 0
    samples: list[tuple[float, int]] = []  # (seconds since start, RSS KiB) every 0.5 s
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=120) as http:
        t0 = time.perf_counter()
        stop_at = t0 + args.seconds
        tasks = [
            asyncio.create_task(
                _client(http, args.profile, images, stop_at, args.history_every, lat, codes, k)
            )
            for k in range(args.clients)
        ]
        while not all(t.done() for t in tasks):
            if pid:
                rss = _rss_kib(pid)[0]
                peak_seen = max(peak_seen, rss)
                samples.append((time.perf_counter() - t0, rss))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    arr = np.asarray(lat) * 1000.0
    codes_a = np.asarray(codes)
    peak = max(peak_seen, _rss_kib(pid)[1]) if pid else 0
    # memory flatness: median RSS of the second quarter (after warm-up) vs the last quarter
    q2 = [r for t, r in samples if wall / 4 <= t < wall / 2]
    q4 = [r for t, r in samples if t >= 3 * wall / 4]
    rss_q2 = float(np.median(q2)) / 1024 if q2 else None
    rss_q4 = float(np.median(q4)) / 1024 if q4 else None
    return {
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests": int(arr.size),
        "requests_per_s": round(arr.size / wall, 2),
        "p50_ms": round(float(np.percentile(arr, 50)), 1) if arr.size else None,
        "p90_ms": round(float(np.percentile(arr, 90)), 1) if arr.size else None,
        "p99_ms": round(float(np.percentile(arr, 99)), 1) if arr.size else None,
        "max_ms": round(float(arr.max()), 1) if arr.size else None,
        "errors": int(((codes_a < 200) | (codes_a >= 300)).sum()),
        "errors_5xx": int((codes_a >= 500).sum()),
        "connection_errors": int((codes_a == -1).sum()),
        "server_peak_rss_mib": round(peak / 1024, 1) if peak else None,
        "server_rss_2nd_quarter_mib": round(rss_q2, 1) if rss_q2 else None,
        "server_rss_last_quarter_mib": round(rss_q4, 1) if rss_q4 else None,
        "server_rss_growth_pct": round(100 * (rss_q4 / rss_q2 - 1), 2)
        if rss_q2 and rss_q4
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="duration (default 60)")
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--server-pid", type=int, help="pid of the running server, for its peak RSS")
    p.add_argument(
        "--token", default=os.environ.get("ANOMALENS_TOKEN"), help="access token if needed"
    )
    p.add_argument(
        "--profile", default="bench", help="profile to inspect with (created if missing)"
    )
    p.add_argument(
        "--history-every", type=int, default=10, help="every n-th request reads history (0: never)"
    )
    p.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(int(args.serve[0]), args.serve[1])
        return 0
    if args.clients < 1 or not 0 < args.seconds <= 3600:
        p.error("--clients must be >= 1 and --seconds in (0, 3600]")

    with tempfile.TemporaryDirectory(prefix="anomalens-load-") as tmp:
        data = _images(Path(tmp) / "synthetic")
        proc = None
        url, pid = args.url, args.server_pid
        if url is None:
            port = _free_port()
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), str(Path(tmp) / "data")], env=env
            )
            url, pid = f"http://127.0.0.1:{port}", proc.pid
        try:
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        http.get("/api/health").raise_for_status()
                        break
                    except httpx.HTTPError:
                        if time.monotonic() > deadline or (proc and proc.poll() is not None):
                            raise SystemExit(
                                f"the server at {url} did not answer /api/health"
                            ) from None
                        time.sleep(0.2)
                if http.get(f"/api/profiles/{args.profile}").status_code == 404:
                    r = http.post(
                        "/api/profiles",
                        data={"name": args.profile, **PROFILE_FORM},
                        files=[("files", (n, d, "image/png")) for n, d in data["normal"]],
                    )
                    r.raise_for_status()
                # warm-up: the first call may refit the profile's detector
                http.post(
                    f"/api/profiles/{args.profile}/inspect",
                    files={"files": (data["test"][0][0], data["test"][0][1], "image/png")},
                ).raise_for_status()
            row = asyncio.run(_load(args, url, data["test"], pid))
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
