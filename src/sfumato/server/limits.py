"""What one request or job may ask for, and the rule for which addresses may be bound without a key."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import UsageError


@dataclass
class Limits:
    """Caps the server enforces; a request over one gets a 4xx naming the limit."""

    max_queue: int = 8  # generation jobs waiting behind the running one; more get 429
    max_body: int = 16 << 20  # request body bytes (413)
    max_pixels: int = 2048 * 2048  # per uploaded image, checked from its header (422)
    max_prompt: int = 1000  # characters of a prompt, negative prompt, caption or query text (422)
    max_steps: int = 150
    max_images: int = 8  # images per generation job (batch_size * n_iter)
    max_side: int = 1024  # generated width and height, pixels
    # Compute, in native-image steps: one image at the model's native size through one sampler step is
    # 1 (job_cost). max_cost bounds a whole job (8 images x 50 steps at native size cost 400); 1024x1024
    # x 150 steps on a 64-px model costs 38,400.
    max_cost: float = 1000.0
    # One sampler step of the batch, same unit. A cancel is checked before every layer of the UNet and
    # the VAE decoder (work.stoppable), so it waits for one layer, then for the decode of what the
    # sampler reached, which a client's cancel returns; that decode grows with the batch's pixels, which
    # this bounds. At 8 (8 images at native size, or one at 2.8x the native side) a cancel ended the job
    # in 0.2 s with the 64-px default model on 2 CPU cores, one torch thread (1.5 s with the cores shared
    # by other work). max_cost alone would allow 1024x1024 in a step or two on a 64-px model: minutes
    # per VAE decode on a CPU.
    max_step_cost: float = 8.0
    max_k: int = 200  # search results per query
    # clip-retrieval result ids per query: beyond num_images (<= max_k) they carry id and similarity only,
    # and its web page asks for 3,000 to fetch their metadata as the user scrolls
    max_result_ids: int = 3000
    max_uploads: int = 64  # images per index-add or classify request
    max_labels: int = 64  # zero-shot labels per classify request
    max_templates: int = 16  # prompt templates per classify request
    max_label_texts: int = 512  # labels x templates: text-tower inputs one classify may embed
    job_seconds: float = 600.0  # a running job that takes longer fails (504 on the waiting endpoints)
    keep_jobs: int = 32  # finished jobs (and their images) remembered for GET /v1/jobs/{id}
    preview_seconds: float = 0.5  # at most one step preview per this many seconds


def job_cost(width: int, height: int, native: int, steps: int, n: int) -> tuple[float, float]:
    """(whole job, one sampler step) in native-image steps: (width*height / native**2) * n per step.
    Sampling time grows at least linearly with pixels (attention faster), so this undercounts large sizes;
    max_step_cost keeps those sizes small."""
    step = width * height / native**2 * n
    return step * steps, step


def check_cost(width: int, height: int, native: int, steps: int, n: int, limits: Limits) -> None:
    """Refuse a generation job over max_cost or max_step_cost, naming its cost and the limits."""
    total, step = job_cost(width, height, native, steps, n)
    if total <= limits.max_cost and step <= limits.max_step_cost:
        return
    over = "per step" if step > limits.max_step_cost else "per job"
    size = f"{width}x{height} = {_num(width * height / native**2)} x the native {native}x{native}"
    raise UsageError(f"this job costs {_num(total)} native-image steps, {_num(step)} per sampler step "
                     f"({size}, x {steps} steps x {n} image(s)), over the limit {over}; the limits are "
                     f"{_num(limits.max_cost)} per job and {_num(limits.max_step_cost)} per step: ask for fewer "
                     "steps, images or pixels")


def check_passes(passes: list[tuple[str, int, int, int, int]], native: int, limits: Limits) -> None:
    """Refuse a job of several passes (name, width, height, steps, images), as AUTOMATIC1111's hires fix,
    whose summed cost is over max_cost: each pass alone may be within it. Checked before queueing."""
    costs = [job_cost(w, h, native, steps, n)[0] for _, w, h, steps, n in passes]
    total = sum(costs)
    if total <= limits.max_cost:
        return
    parts = "; ".join(f"{name} {w}x{h} x {steps} steps x {n} image(s) = {_num(c)}"
                      for (name, w, h, steps, n), c in zip(passes, costs))
    raise UsageError(f"this job costs {_num(total)} native-image steps in all ({parts}; native size {native}x{native}), "
                     f"over the limit of {_num(limits.max_cost)} per job: ask for fewer steps, images or pixels")


def _num(x: float) -> str:
    """1,200 or 13.5 or 0.25: thousands separated, at most two decimals, no exponent."""
    return f"{x:,.2f}".rstrip("0").rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(bind: str, extra: list[str] = ()) -> list[str] | None:
    """The Host header values a server bound to `bind` answers (against DNS rebinding): a loopback
    server its own names and the hosts the user adds; a public one any host unless some are named."""
    def name(h: str) -> str:
        h = h.strip().lower()
        return f"[{h}]" if ":" in h and not h.startswith("[") else h  # IPv6 as in a Host header

    if not is_loopback(bind) and not extra:
        return None
    hosts = [*LOOPBACK_NAMES, name(bind), *map(name, extra)]
    return list(dict.fromkeys(h for h in hosts if h not in ("0.0.0.0", "[::]")))


def check_origins(origins: list[str]) -> list[str]:
    """--cors values: "*" or origins as a browser sends them (scheme://host[:port], no path), which
    CORSMiddleware compares as exact strings."""
    from urllib.parse import urlsplit

    for o in origins:
        if o == "*":
            continue
        try:
            u = urlsplit(o)
            ok = u.scheme in ("http", "https") and bool(u.hostname) and o == f"{u.scheme}://{u.netloc}"
        except ValueError:
            ok = False
        if not ok or o != o.lower():
            raise UsageError(f"--cors {o!r}: give an origin as a browser sends it, scheme://host[:port] in lower "
                             "case without a path (https://example.org), or *")
    return list(origins)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} is reachable from other machines; set --api-key KEY "
                         "(or SFUMATO_API_KEY) to serve there, or bind 127.0.0.1")
