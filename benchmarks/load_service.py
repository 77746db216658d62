"""Load test of the inspection service: N concurrent clients on loopback for T seconds.

Starts its own server (uvicorn in a subprocess, small seeded-random PatchCore profile on a
synthetic category) unless ``--url`` points at a running one. Each client loops: inspect one
image (POST /api/profiles/<p>/inspect), and every ``--history-every``-th request read a page
of history instead. Prints one flat row: requests/s, latency percentiles, errors (5xx apart),
peak RSS of the server process.

``--mode mixed`` adds decoded-size attackers: every ``--attack-every``-th request sends a small
PNG that decodes to a huge image, in turn one over the per-image limit (8000 x 8000, refused
from its header: a 400 counted in ``refused_4xx``) and one just under it (7000 x 7000, ~60 KB,
49 MP: decoded, reduced, inspected). ``--mode restart`` submits jobs and single inspections,
kills the server with SIGKILL mid-way, starts it again on the same data folder and checks that
no acknowledged result and no job was lost, that every job finishes, that no image got two
results, and that a retried submission (same ``Idempotency-Key``) maps onto its job.

    python benchmarks/load_service.py                        # 50 clients, 60 s
    python benchmarks/load_service.py --clients 10 --seconds 10
    python benchmarks/load_service.py --mode mixed --clients 50 --seconds 60
    python benchmarks/load_service.py --mode restart --jobs 8 --job-images 40
    python benchmarks/load_service.py --url http://127.0.0.1:8000 --server-pid 1234 --token ...
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

PROFILE_FORM = {
    "method": "patchcore",
    "backbone": "resnet18",
    "weights": "random",
    "image_size": "64",
}


CLIENT_HEADERS = {"X-Anomalens-Client": "1"}


def _headers(token: str | None) -> dict[str, str]:
    return {**CLIENT_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}


def _png_of_size(width: int, height: int, grey: int = 128) -> bytes:
    """A complete 8-bit greyscale PNG of ``width`` x ``height`` (tens of KB, compressed)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([grey]) * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


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
    attackers: list[tuple[str, bytes]] | None = None,
    attack_every: int = 0,
) -> None:
    i = offset
    while time.perf_counter() < stop_at:
        i += 1
        t0 = time.perf_counter()
        try:
            if history_every and i % history_every == 0:
                r = await http.get("/api/results", params={"limit": 20})
            else:
                if attackers and attack_every and i % attack_every == 0:
                    name, data = attackers[(i // attack_every) % len(attackers)]
                else:
                    name, data = images[i % len(images)]
                r = await http.post(
                    f"/api/profiles/{profile}/inspect", files={"files": (name, data, "image/png")}
                )
                if r.status_code == 200 and r.json()["errors"]:
                    r.status_code = 400  # the one upload was refused (reported per file)
            codes.append(r.status_code)
        except httpx.HTTPError:
            codes.append(-1)  # connection error / timeout
        lat.append(time.perf_counter() - t0)


async def _load(
    args: argparse.Namespace, url: str, images: list[tuple[str, bytes]], pid: int | None
) -> dict:
    headers = _headers(args.token)
    attackers = None
    if args.mode == "mixed":
        attackers = [
            ("attacker_8000x8000.png", _png_of_size(8000, 8000)),
            ("attacker_7000x7000.png", _png_of_size(7000, 7000)),
        ]
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
                _client(
                    http,
                    args.profile,
                    images,
                    stop_at,
                    args.history_every,
                    lat,
                    codes,
                    k,
                    attackers,
                    args.attack_every,
                )
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
        "mode": args.mode,
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
        "refused_4xx": int(((codes_a >= 400) & (codes_a < 500)).sum()),
        "connection_errors": int((codes_a == -1).sum()),
        "server_peak_rss_mib": round(peak / 1024, 1) if peak else None,
        "server_rss_2nd_quarter_mib": round(rss_q2, 1) if rss_q2 else None,
        "server_rss_last_quarter_mib": round(rss_q4, 1) if rss_q4 else None,
        "server_rss_growth_pct": round(100 * (rss_q4 / rss_q2 - 1), 2)
        if rss_q2 and rss_q4
        else None,
    }


def _spawn(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), str(data_dir)], env=env
    )
    return proc, f"http://127.0.0.1:{port}"


def _wait_health(http: httpx.Client, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            http.get("/api/health").raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline or (proc and proc.poll() is not None):
                raise SystemExit(f"the server at {http.base_url} did not answer") from None
            time.sleep(0.2)


def _ensure_profile(http: httpx.Client, name: str, normal: list[tuple[str, bytes]]) -> None:
    if http.get(f"/api/profiles/{name}").status_code == 404:
        r = http.post(
            "/api/profiles",
            data={"name": name, **PROFILE_FORM},
            files=[("files", (n, d, "image/png")) for n, d in normal],
        )
        r.raise_for_status()


def _restart_run(args: argparse.Namespace, tmp: Path, data: dict) -> dict:
    """Jobs and inspections, ``kill -9`` of the server mid-way, restart, then the checks."""
    data_dir = tmp / "data"
    test = data["test"]
    codes: list[int] = []
    jobs: dict[str, tuple[str, int]] = {}  # idempotency key -> (job id, images)
    acked: list[int] = []
    proc, url = _spawn(data_dir)
    with httpx.Client(base_url=url, headers=_headers(args.token), timeout=120) as http:
        _wait_health(http, proc)
        _ensure_profile(http, args.profile, data["normal"])
        for j in range(args.jobs):
            key = f"bench-job-{j}"
            files = [
                ("files", (f"j{j:02d}_{k:03d}_{n}", d, "image/png"))
                for k, (n, d) in enumerate(test[i % len(test)] for i in range(args.job_images))
            ]
            r = http.post(
                f"/api/profiles/{args.profile}/jobs", files=files, headers={"Idempotency-Key": key}
            )
            codes.append(r.status_code)
            if r.status_code == 202:
                jobs[key] = (r.json()["id"], args.job_images)
        stop = time.monotonic() + args.kill_after
        i = 0
        while time.monotonic() < stop:  # acknowledged single inspections while the jobs run
            n, d = test[i % len(test)]
            i += 1
            r = http.post(
                f"/api/profiles/{args.profile}/inspect", files={"files": (f"s{i:04d}_{n}", d)}
            )
            codes.append(r.status_code)
            if r.status_code == 200:
                acked += [rec["id"] for rec in r.json()["results"]]
        done_before = sum(http.get(f"/api/jobs/{jid}").json()["done"] for jid, _ in jobs.values())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc, url = _spawn(data_dir)
    t0 = time.perf_counter()
    peak = 0
    try:
        with httpx.Client(base_url=url, headers=_headers(args.token), timeout=120) as http:
            _wait_health(http, proc)
            retry_key, (retry_id, _) = next(iter(jobs.items()))
            retried = http.post(
                f"/api/profiles/{args.profile}/jobs",
                files=[("files", test[0])],
                headers={"Idempotency-Key": retry_key},
            )
            codes.append(retried.status_code)
            states: dict[str, dict] = {}
            deadline = time.monotonic() + args.finish_timeout
            while time.monotonic() < deadline:
                peak = max(peak, _rss_kib(proc.pid)[0])
                states = {}
                for jid, _ in jobs.values():
                    r = http.get(f"/api/jobs/{jid}")
                    codes.append(r.status_code)
                    states[jid] = r.json() if r.status_code == 200 else {"status": "lost"}
                if all(st["status"] not in ("queued", "running") for st in states.values()):
                    break
                time.sleep(1.0)
            finish_s = time.perf_counter() - t0
            lost = 0
            for rid in acked:
                r = http.get(f"/api/results/{rid}")
                codes.append(r.status_code)
                lost += r.status_code != 200
            rows = list(csv.DictReader(io.StringIO(http.get("/api/results.csv").text)))
            per_image: dict[tuple[str, str], int] = {}
            for row in rows:
                if row["job_id"]:
                    k = (row["job_id"], row["file_name"])
                    per_image[k] = per_image.get(k, 0) + 1
            peak = max(peak, _rss_kib(proc.pid)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    codes_a = np.asarray(codes)
    return {
        "mode": "restart",
        "jobs": len(jobs),
        "images_per_job": args.job_images,
        "job_images_done_before_kill": done_before,
        "results_acknowledged_before_kill": len(acked),
        "jobs_found_after_restart": sum(st["status"] != "lost" for st in states.values()),
        "jobs_done": sum(st["status"] == "done" for st in states.values()),
        "jobs_failed": sum(st["status"] == "failed" for st in states.values()),
        "job_results": sum(len(st.get("results", [])) for st in states.values()),
        "acknowledged_results_lost": lost,
        "images_with_two_results": sum(c > 1 for c in per_image.values()),
        "retry_same_job": retried.status_code == 202 and retried.json().get("id") == retry_id,
        "errors_5xx": int((codes_a >= 500).sum()),
        "seconds_to_finish_after_restart": round(finish_s, 1),
        "server_peak_rss_after_restart_mib": round(peak / 1024, 1),
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
    p.add_argument(
        "--mode",
        choices=("plain", "mixed", "restart"),
        default="plain",
        help="plain load, load with decoded-size attackers, or kill-and-restart (see above)",
    )
    p.add_argument(
        "--attack-every", type=int, default=7, help="mixed: every n-th request is an attacker"
    )
    p.add_argument("--jobs", type=int, default=8, help="restart: jobs submitted before the kill")
    p.add_argument("--job-images", type=int, default=40, help="restart: images per job")
    p.add_argument(
        "--kill-after", type=float, default=10.0, help="restart: seconds of load before SIGKILL"
    )
    p.add_argument(
        "--finish-timeout", type=float, default=600.0, help="restart: wait for the jobs (s)"
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
        if args.mode == "restart":
            if args.url:
                p.error("--mode restart starts (and kills) its own server; leave out --url")
            print(json.dumps(_restart_run(args, Path(tmp), data)))
            return 0
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
            headers = _headers(args.token)
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
