"""Device profiles: the server and the client device kinds (YAML), and which client gets which.

The YAML format is the authors' ``profiles.yaml``: one ``server`` mapping and any number of
device mappings, keyed by device name, in the units of their code::

    server: {computational_frequency_ghz: 42, flops_per_cycle: 16, transmission_rate_bps: 1e9}
    phone:  {cpu_mhz: 6000, flops_per_cycle: 8, data_rate: 150e6}

The authors call the server's ``flops_per_cycle`` ``cpu_cycles_per_flop``, but their code
multiplies the frequency by it, so it is FLOPs per cycle; huscf names it for what it does and
reads the authors' name too (docs/latency.md).

``load_profiles("paper")`` reads the seven profiles shipped with huscf; any other string is a path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from huscf.errors import HuscfError

SERVER_KEYS = ("computational_frequency_ghz", "flops_per_cycle", "transmission_rate_bps")
AUTHORS_SERVER_KEY = "cpu_cycles_per_flop"  # the authors' name for the server's flops_per_cycle
DEVICE_KEYS = ("cpu_mhz", "flops_per_cycle", "data_rate")


@dataclass(frozen=True)
class ServerProfile:
    computational_frequency_ghz: float
    flops_per_cycle: float  # the authors' ``cpu_cycles_per_flop`` (their code multiplies by it)
    transmission_rate_bps: float

    @property
    def flops_per_s(self) -> float:
        return self.computational_frequency_ghz * 1e9 * self.flops_per_cycle

    @property
    def rate(self) -> float:
        """Divisor of bytes: transfer seconds = bytes / rate (as in the authors' code)."""
        return self.transmission_rate_bps


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cpu_mhz: float
    flops_per_cycle: float
    data_rate: float

    @property
    def flops_per_s(self) -> float:
        return self.cpu_mhz * 1e6 * self.flops_per_cycle

    @property
    def rate(self) -> float:
        """Divisor of bytes: transfer seconds = bytes / rate (as in the authors' code)."""
        return self.data_rate


def _fields(where: str, spec, keys: Sequence[str]) -> dict[str, float]:
    if not isinstance(spec, dict):
        raise HuscfError(f"{where}: expected a mapping with keys {', '.join(keys)}, got {spec!r}")
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise HuscfError(f"{where}: unknown field '{unknown[0]}' (expected {', '.join(keys)})")
    out = {}
    for key in keys:
        if key not in spec:
            raise HuscfError(f"{where}: missing field '{key}'")
        value = spec[key]
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML reads 1e9 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise HuscfError(f"{where}: field '{key}' must be a positive number, got {spec[key]!r}")
        out[key] = float(value)
    return out


def parse_profiles(data, source: str = "profiles") -> tuple[ServerProfile, list[DeviceProfile]]:
    """Validate a loaded YAML document; every error is one line naming the device and field."""
    if not isinstance(data, dict):
        raise HuscfError(f"{source}: expected a mapping of 'server' and device profiles")
    if "server" not in data:
        raise HuscfError(f"{source}: missing the 'server' profile")
    spec = data["server"]
    if isinstance(spec, dict) and AUTHORS_SERVER_KEY in spec:
        if "flops_per_cycle" in spec:
            raise HuscfError(f"{source}: server: give flops_per_cycle or the authors' {AUTHORS_SERVER_KEY}, not both")
        spec = {("flops_per_cycle" if k == AUTHORS_SERVER_KEY else k): v for k, v in spec.items()}
    server = ServerProfile(**_fields(f"{source}: server", spec, SERVER_KEYS))
    devices = [DeviceProfile(str(name), **_fields(f"{source}: device '{name}'", spec, DEVICE_KEYS))
               for name, spec in data.items() if name != "server"]
    if not devices:
        raise HuscfError(f"{source}: no device profiles (need at least one besides 'server')")
    return server, devices


def load_profiles(name_or_path: str | Path = "paper") -> tuple[ServerProfile, list[DeviceProfile]]:
    """Read ``"paper"`` (the shipped profiles) or a YAML file."""
    if str(name_or_path) == "paper":
        text = resources.files("huscf").joinpath("resources/devices_paper.yaml").read_text()
    else:
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except OSError as e:
            raise HuscfError(f"profiles {name_or_path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise HuscfError(f"profiles {name_or_path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HuscfError(f"profiles {name_or_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_profiles(data, f"profiles {name_or_path}")


def assign_devices(devices: Sequence[DeviceProfile], num_clients: int,
                   how: str | Sequence[int | str] = "round_robin", seed: int = 0) -> list[DeviceProfile]:
    """One device profile per client.

    ``round_robin``: client i gets device i mod D (even counts). ``shuffle``: the same counts in a
    seeded random order. A list: explicit, one device index or name per client.
    """
    if not devices:
        raise HuscfError("assignment: no device profiles to assign")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise HuscfError(f"assignment: number of clients must be a positive integer, got {num_clients!r}")
    if isinstance(how, str):
        even = [devices[i % len(devices)] for i in range(num_clients)]
        if how == "round_robin":
            return even
        if how == "shuffle":
            return [even[i] for i in np.random.default_rng(seed).permutation(num_clients)]
        raise HuscfError(f"assignment: unknown policy '{how}' (round_robin, shuffle or a list per client)")
    if len(how) != num_clients:
        raise HuscfError(f"assignment: the explicit list has {len(how)} entries for {num_clients} clients")
    by_name = {d.name: d for d in devices}
    out = []
    for client, key in enumerate(how):
        if isinstance(key, str) and key in by_name:
            out.append(by_name[key])
        elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(devices):
            out.append(devices[key])
        else:
            raise HuscfError(f"assignment: client {client}: unknown device {key!r}")
    return out
