"""Load-test `sfumato serve` on this machine: concurrent search clients, then a generation flood.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_serve.py --model MODEL --index INDEX
    ... --clients 20 --seconds 60 --flood 40 --steps 10

It starts the server itself on 127.0.0.1 (a free port; never another address), waits for /readyz,
and stops it at the end. Phase 1: --clients threads post /v1/search for --seconds; it reports
requests/s, p50/p95/p99 latency and errors. Phase 2: --flood generation jobs posted at once against a
queue of --max-queue; every accepted job must finish, the rest must get 429, none a 5xx, while two
search clients keep measuring latency. Phase 3 (--refusals): with the queue held full by long jobs,
--refusal-clients concurrent requests post generations for --refusal-seconds (each gets a 429 decided
from the headers) while another process times /healthz; then --body-clients post --body-mb MB JSON
bodies to /v1/generate (refused from the headers; the server still receives the bytes) and to
/v1/search (read, parsed and decoded, then refused). It reports latency p50/p99 by status, /healthz
p50/p99 against idle and busy-lane baselines, and the CPU the server's event loop spent per request.
Phase 4 (--crash): SIGKILL the server while a job runs and index adds are in flight, restart it, and
report whether it comes back ready with its indexes whole. Everything is bounded in count and time
(--deadline).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design
QUERIES = ["a red circle", "a blue square", "two green triangles", "a small yellow cross", "a purple circle "
           "above an orange square", "three red squares on a black background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sfumato", "serve", "--host", HOST, "--port", str(port),
           "--max-queue", str(args.max_queue), "--job-seconds", str(args.job_seconds)]
    if args.model:
        cmd += ["--model", args.model]
    for ix in args.index or ():
        cmd += ["--index", ix]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SFUMATO_LOG": "warning"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(client, proc, timeout: float) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().strip()[-500:]}")
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return r.json()
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {timeout:g} s")


def summarise(lat: list[float], codes: list[int], seconds: float) -> dict:
    ok = [t for t, c in zip(lat, codes) if c == 200]
    q = np.percentile(ok, [50, 95, 99]) * 1000 if ok else [float("nan")] * 3
    return {"requests": len(codes), "requests_per_s": round(len(codes) / seconds, 1),
            "p50_ms": round(float(q[0]), 1), "p95_ms": round(float(q[1]), 1), "p99_ms": round(float(q[2]), 1),
            "errors": sum(c != 200 for c in codes), "5xx": sum(c >= 500 for c in codes)}


def search_load(base: str, headers: dict, clients: int, seconds: float, k: int, stop: threading.Event | None = None):
    """`clients` threads posting /v1/search until `seconds` pass (or `stop` is set)."""
    import httpx

    lat, codes, lock = [], [], threading.Lock()
    end = time.time() + seconds

    def worker(i: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            n = i
            while time.time() < end and not (stop and stop.is_set()):
                t = time.perf_counter()
                try:
                    code = c.post("/v1/search", json={"text": QUERIES[n % len(QUERIES)], "k": k}).status_code
                except httpx.HTTPError:
                    code = 0
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    codes.append(code)
                n += 1

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(lat, codes, time.time() - t0)


def flood(base: str, headers: dict, n: int, steps: int, deadline: float) -> dict:
    """Post n generation jobs at once; follow every accepted one to its end."""
    import httpx

    codes, ids, lock = [], [], threading.Lock()
    start = threading.Barrier(n)

    def post(i: int) -> None:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            start.wait()
            r = c.post("/v1/generate", json={"prompt": QUERIES[i % len(QUERIES)], "steps": steps, "seed": i})
            with lock:
                codes.append(r.status_code)
                if r.status_code == 202:
                    ids.append(r.json()["id"])

    t0 = time.time()
    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = {}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        pending = set(ids)
        while pending and time.time() < deadline:
            for job_id in list(pending):
                j = c.get(f"/v1/jobs/{job_id}").json()
                if j["status"] in ("done", "failed", "cancelled"):
                    statuses[j["status"]] = statuses.get(j["status"], 0) + 1
                    pending.discard(job_id)
            time.sleep(0.2)
    return {"posted": n, "accepted": codes.count(202), "rejected_429": codes.count(429),
            "5xx": sum(c >= 500 for c in codes), "other": sum(c not in (202, 429) and c < 500 for c in codes),
            "finished": statuses, "unfinished": len(pending), "seconds": round(time.time() - t0, 1)}


def timed(lat: list[float]) -> dict:
    q = np.percentile(lat, [50, 99]) * 1000 if lat else [float("nan")] * 2
    return {"n": len(lat), "p50_ms": round(float(q[0]), 1), "p99_ms": round(float(q[1]), 1)}


class RawClient:
    """A bare HTTP/1.1 keep-alive connection over asyncio streams, for the refusal phase: httpx spends
    milliseconds of CPU per request, which on a busy machine timed the client more than the server."""

    def __init__(self, base: str, headers: dict):
        from urllib.parse import urlsplit

        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": u.netloc, **headers}.items())
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        import asyncio

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\n{self.headers}Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        code = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        return code

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _probe_health(base: str, seconds: float, conn) -> None:
    """(In its own process, so the load does not delay it.) Time GET /healthz every 20 ms on one
    connection for `seconds`; a failed request counts as 30 s."""
    import asyncio

    async def run() -> list[float]:
        c, lat, end = RawClient(base, {}), [], time.time() + seconds
        while time.time() < end:
            t = time.perf_counter()
            try:
                ok = await asyncio.wait_for(c.request("GET", "/healthz"), 30) == 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                ok = False
                c.close()
            lat.append(time.perf_counter() - t if ok else 30.0)
            await asyncio.sleep(0.02)
        return lat

    conn.send(asyncio.run(run()))


def body_of(kind: str, mb: int) -> bytes:
    """A `mb` MB JSON body: 'small' a valid 1-step generation; 'generate' a prompt far over the limit
    (refused); 'search' a base64 image of zeros (read, parsed and decoded, then refused)."""
    size = mb << 20
    if kind == "small":
        return json.dumps({"prompt": QUERIES[0], "steps": 1}).encode()
    if kind == "generate":
        return b'{"prompt": "' + b"x" * (size - 15) + b'"}'
    return b'{"image": "' + b"A" * ((size - 13) // 4 * 4) + b'"}'


def _hammer(base: str, headers: dict, clients: int, path: str, kind: str, mb: int, seconds: float, conn) -> None:
    """(In its own process.) `clients` connections, each posting a body_of(kind, mb) to `path` again
    and again for `seconds`; sends the latencies by status code (0: the connection failed)."""
    import asyncio

    body = body_of(kind, mb)
    lat: dict[int, list[float]] = {}

    async def client(end: float) -> None:
        c = RawClient(base, {**headers, "Content-Type": "application/json"})
        while time.time() < end:
            t = time.perf_counter()
            try:
                code = await c.request("POST", path, body)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                code = 0
                c.close()
            lat.setdefault(code, []).append(time.perf_counter() - t)
        c.close()

    async def run() -> None:
        end = time.time() + seconds
        await asyncio.gather(*(client(end) for _ in range(clients)))

    asyncio.run(run())
    conn.send({str(code): timed(v) for code, v in sorted(lat.items())})


def loop_cpu(pid: int) -> float | None:
    """CPU seconds the server's main thread has used: uvicorn runs its event loop there, which reads
    and parses every request and answers health checks (the lane and the thread pool are other
    threads). None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_while(base: str, headers: dict, seconds: float, load: tuple | None = None,
                 server_pid: int | None = None) -> tuple[dict, dict | None, float | None]:
    """/healthz latency for `seconds` while `load` = (clients, path, kind, mb) hammers the server (None:
    idle); prober and load run in processes of their own. Also the event loop's CPU seconds meanwhile."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    jobs = [(_probe_health, (base, seconds))] + ([(_hammer, (base, headers, *load, seconds))] if load else [])
    pipes, procs = [], []
    for target, extra in jobs:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*extra, send), daemon=True)
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    cpu0 = loop_cpu(server_pid) if server_pid else None
    results = [r.recv() for r in pipes]
    cpu1 = loop_cpu(server_pid) if server_pid else None
    for proc in procs:
        proc.join(30)
    cpu = round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None
    return timed(results[0]), (results[1] if load else None), cpu


def fill_queue(base: str, headers: dict, steps: int, n: int, limit: int = 100) -> list[str]:
    """Post long generation jobs until one gets 429: the lane busy and every queue slot taken."""
    import httpx

    ids = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        for i in range(limit):
            r = c.post("/v1/generate", json={"prompt": QUERIES[i % len(QUERIES)], "steps": steps, "n": n, "seed": i})
            if r.status_code != 202:
                break
            ids.append(r.json()["id"])
    return ids


def refusals(args, base: str, headers: dict, server_pid: int) -> dict:
    """429 latency with the queue held full (kept full by a refilling thread), and /healthz latency under
    that flood and under large bodies, with the event loop's CPU per request: on a loaded machine the
    latencies say as much about its scheduler as about the server."""
    import httpx

    seconds, mb = args.refusal_seconds, args.body_mb
    report = {"health_idle": health_while(base, headers, min(seconds, 5))[0]}
    held = fill_queue(base, headers, args.hold_steps, args.hold_images)
    report["held_jobs"] = len(held)
    stop = threading.Event()

    def keep_full() -> None:  # a slot freed by a finished job is taken again within 0.2 s
        while not stop.wait(0.2):
            held.extend(fill_queue(base, headers, args.hold_steps, args.hold_images))

    refill = threading.Thread(target=keep_full)
    refill.start()
    report["health_busy_lane"] = health_while(base, headers, min(seconds, 5))[0]
    for name, load in (("flood", (args.refusal_clients, "/v1/generate", "small", 0)),
                       ("large_generate", (args.body_clients, "/v1/generate", "generate", mb)),
                       ("large_search", (args.body_clients, "/v1/search", "search", mb))):
        health, by_status, cpu = health_while(base, headers, seconds, load, server_pid)
        n = sum(v["n"] for v in by_status.values())
        report[name] = {"health": health, "by_status": by_status,
                        "loop_cpu_ms_per_request": round(cpu / n * 1000, 2) if cpu is not None and n else None}
    stop.set()
    refill.join()
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        for job_id in held:
            c.delete(f"/v1/jobs/{job_id}")
    return report


def crash_restart(args, base: str, headers: dict, proc: subprocess.Popen, port: int) -> tuple[dict, subprocess.Popen]:
    """SIGKILL the server while a generation job runs and index adds are in flight, start it again,
    and check that it comes back ready with every index whole (the last committed version)."""
    import base64
    import io

    import httpx
    from PIL import Image

    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        before = {ix["name"]: ix for ix in c.get("/v1/indexes").json()}
        c.post("/v1/generate", json={"prompt": QUERIES[0], "steps": 50, "n": 4})

        def add(i: int) -> None:  # fresh pictures, so every add really writes
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3))).save(buf, "PNG")
            try:
                httpx.post(f"{base}/v1/index/{name}/add", headers=headers, timeout=30,
                           json={"images": [{"image": base64.b64encode(buf.getvalue()).decode()}]})
            except httpx.HTTPError:
                pass  # the kill cuts it off

        name = next(iter(before))
        rng = np.random.default_rng(time.time_ns())  # new pictures each run, so the adds are not skipped
        adders = [threading.Thread(target=add, args=(i,), daemon=True) for i in range(8)]
        for t in adders:
            t.start()
        time.sleep(1.5)
    proc.kill()
    proc.wait()
    t0 = time.time()
    proc = start_server(args, port)
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        wait_ready(c, proc, 300)
        ready_s = time.time() - t0
        after = {ix["name"]: ix for ix in c.get("/v1/indexes").json()}
        search = c.post("/v1/search", json={"text": QUERIES[0], "k": 5})
    return {"restart_ready_s": round(ready_s, 1),
            "indexes": {n: {"count_before": before[n]["count"], "count_after": after.get(n, {}).get("count"),
                            "version_before": before[n]["version"], "version_after": after.get(n, {}).get("version")}
                        for n in before},
            "search_after_restart": search.status_code}, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Model folder with a UNet and clip/ (default: shipped model).")
    ap.add_argument("--index", action="append", help="Index built with that model (needed for search).")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--flood", type=int, default=40, help="Generation jobs posted at once.")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--job-seconds", type=float, default=120.0)
    ap.add_argument("--refusals", action=argparse.BooleanOptionalAction, default=True,
                    help="Time 429s and /healthz under a flood on a full queue and under large bodies.")
    ap.add_argument("--refusal-clients", type=int, default=30)
    ap.add_argument("--refusal-seconds", type=float, default=15.0)
    ap.add_argument("--hold-steps", type=int, default=150, help="Steps of the jobs that hold the queue full.")
    ap.add_argument("--hold-images", type=int, default=4, help="Images of each of those jobs.")
    ap.add_argument("--body-clients", type=int, default=2)
    ap.add_argument("--body-mb", type=int, default=15)
    ap.add_argument("--crash", action=argparse.BooleanOptionalAction, default=True,
                    help="Finally SIGKILL the server mid-job and mid-add and restart it.")
    ap.add_argument("--deadline", type=float, default=600.0, help="Stop everything after this many seconds.")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 0 < args.seconds <= 600 and 0 <= args.flood <= 200):
        raise SystemExit("--clients 1-64, --seconds up to 600 and --flood up to 200 keep the run bounded")
    if not (1 <= args.refusal_clients <= 64 and 0 < args.refusal_seconds <= 120 and 1 <= args.body_clients <= 8
            and 1 <= args.body_mb <= 64):
        raise SystemExit("--refusal-clients 1-64, --refusal-seconds up to 120, --body-clients 1-8 and --body-mb "
                         "1-64 keep the run bounded")
    import httpx

    t_start = time.time()
    port = free_port()
    proc = start_server(args, port)
    base = f"http://{HOST}:{port}"
    headers: dict = {}  # loopback: no API key needed
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            ready = wait_ready(c, proc, 300)
        report = {"server": ready, "threads": os.environ.get("OMP_NUM_THREADS", "all")}
        if ready["indexes"]:
            report["search"] = search_load(base, headers, args.clients, args.seconds, args.k)
            print(f"search, {args.clients} clients, {args.seconds:g} s: {json.dumps(report['search'])}", flush=True)
        if args.flood:
            stop = threading.Event()
            during = {}
            if ready["indexes"]:
                bg = threading.Thread(target=lambda: during.update(
                    search_load(base, headers, 2, args.deadline, args.k, stop)))
                bg.start()
            report["flood"] = flood(base, headers, args.flood, args.steps, t_start + args.deadline)
            stop.set()
            if ready["indexes"]:
                bg.join()
                report["search_during_flood"] = during
            print(f"generation flood of {args.flood} (queue {args.max_queue}, {args.steps} steps): "
                  f"{json.dumps(report['flood'])}", flush=True)
            if during:
                print(f"search during the flood, 2 clients: {json.dumps(during)}", flush=True)
        if args.refusals:
            report["refusals"] = r = refusals(args, base, headers, proc.pid)
            print(f"/healthz idle: {json.dumps(r['health_idle'])}; lane busy, queue full ({r['held_jobs']} jobs held): "
                  f"{json.dumps(r['health_busy_lane'])}", flush=True)
            for name, what in (("flood", f"{args.refusal_clients} clients posting generations on the full queue"),
                               ("large_generate", f"{args.body_clients} clients posting {args.body_mb} MB to "
                                                  "/v1/generate (full queue)"),
                               ("large_search", f"{args.body_clients} clients posting {args.body_mb} MB to "
                                                "/v1/search")):
                x = r[name]
                print(f"{what}: by status {json.dumps(x['by_status'])}, event loop CPU {x['loop_cpu_ms_per_request']} "
                      f"ms per request; /healthz {json.dumps(x['health'])}", flush=True)
        if args.crash and ready["indexes"]:
            report["crash"], proc = crash_restart(args, base, headers, proc, port)
            print(f"SIGKILL mid-job and mid-add, then restart: {json.dumps(report['crash'])}", flush=True)
        print(json.dumps(report, indent=1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
