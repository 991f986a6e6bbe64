"""Starting or joining Ray.

Without an address huscf starts a private Ray on this machine, bound to loopback (127.0.0.1),
with usage statistics off and no dashboard; ``HUSCF_RAY_TMPDIR`` chooses its temp folder. With
an address (``auto`` or ``HOST:PORT`` of a ``ray start --head`` node) it joins that cluster and
leaves it running afterwards. A private Ray's processes end with the driver even when the driver
is killed (``reaper``). If Ray is already initialised in this process it is used as is.
"""

from __future__ import annotations

import os
import socket

from huscf.engines.threads import usable_cores
from huscf.errors import HuscfError
from huscf.runtime.reaper import start_watcher, unmark


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable ``HOST:PORT`` (Ray itself retries for minutes)."""
    if "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise HuscfError(f"cannot reach a Ray cluster at {address!r} ({exc.__class__.__name__}: {exc}); start one "
                         f"with 'ray start --head' or leave out --address for a local Ray") from None


def connect(address: str | None):
    """(the ray module, whether this call started Ray, CPUs of the cluster)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:  # read at import: without it Ray advertises the host's address, not loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise HuscfError("the ray engine needs Ray: pip install 'huscf[ray]' (or pip install ray)") from None
    owns = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": True,
                  "logging_level": "warning"}
        try:
            if address:
                _probe(address)
                ray.init(address=address, **kwargs)
            else:
                tmp = os.environ.get("HUSCF_RAY_TMPDIR")
                start_watcher()  # its processes end with this one, even if this one is killed
                owns = True
                # the CPUs this process may use (affinity mask, cgroup quota), not every core of the host
                ray.init(_node_ip_address="127.0.0.1", _temp_dir=tmp, num_cpus=usable_cores(), **kwargs)
        except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
            if owns:
                unmark()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if address:
                raise HuscfError(f"cannot reach a Ray cluster at {address!r}: {first}") from None
            raise HuscfError(f"could not start a local Ray ({type(exc).__name__}: {first}); a short "
                             f"HUSCF_RAY_TMPDIR helps when the message is about a socket path") from None
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return ray, owns, cpus


def disconnect(ray, owns: bool) -> None:
    """Shut down a Ray this process started (a joined cluster keeps running)."""
    if owns:
        if ray.is_initialized():
            ray.shutdown()
        unmark()
