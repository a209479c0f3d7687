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
    max_k: int = 200  # search results per query
    max_uploads: int = 64  # images per index-add or classify request
    max_labels: int = 64  # zero-shot labels per classify request
    max_templates: int = 16  # prompt templates per classify request
    max_label_texts: int = 512  # labels x templates: text-tower inputs one classify may embed
    job_seconds: float = 600.0  # a running job that takes longer fails (504 on the waiting endpoints)
    keep_jobs: int = 32  # finished jobs (and their images) remembered for GET /v1/jobs/{id}
    preview_seconds: float = 0.5  # at most one step preview per this many seconds


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


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} is reachable from other machines; set --api-key KEY "
                         "(or SFUMATO_API_KEY) to serve there, or bind 127.0.0.1")
