"""Split each domain's training set across its clients (iid / noniid / highly_noniid / pathological /
by_group), seeded.

Follows the HuSCF-GAN authors' scenarios: per-client excluded classes and per-client sizes as fractions of
the even share ``len(domain) // clients_per_domain``. Unlike their code, every domain draws from its own
random stream (keyed by seed and domain name), samples are never given to two clients, and a client's
samples are drawn only from its allowed classes so it reaches its target size whenever the pool allows.

``by_group`` is the natural non-IID split of a domain whose samples come in groups (the speakers of
the spoken digits): client c of a domain with G groups takes group c mod G, and the clients of one
group share its samples IID. It needs at least G clients per domain.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from huscf.errors import HuscfError

# scenario -> (exclusion counts, their weights), ((share of clients, fraction of the even share), ...)
SCENARIOS: dict[str, tuple[tuple[tuple[int, ...], tuple[float, ...]], tuple[tuple[float, Fraction], ...]]] = {
    "iid": (((0,), (1.0,)), ((1.0, Fraction(1)),)),
    "noniid": (((0, 2, 3, 4), (0.25, 0.3, 0.1, 0.1)), ((0.3, Fraction(2, 3)), (0.7, Fraction(1)))),
    "highly_noniid": (((2, 3), (0.4, 0.6)),
                      ((0.2, Fraction(1, 6)), (0.3, Fraction(1, 3)), (0.5, Fraction(1)))),
}


def scenario_names() -> tuple[str, ...]:
    """Every value of ``data.scenario`` (the config takes its allowed names from here): the
    ``SCENARIOS`` tables, McMahan et al.'s label shards and the natural split of a domain whose
    samples come in groups."""
    return (*SCENARIOS, "pathological", "by_group")


@dataclass(frozen=True, eq=False)
class ClientPartition:
    """One client's slice: ``indices`` (int64, sorted) into its domain's training arrays."""

    client_id: int
    domain: str
    indices: np.ndarray
    excluded_classes: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)


def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """The random stream of one domain: depends on the seed and the domain's name only."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode())])


def _fractions(n: int, groups, rng: np.random.Generator) -> list[Fraction]:
    """Assign each of n clients a size fraction; group shares are rounded, the last group takes the rest."""
    out: list[Fraction] = []
    for share, frac in groups[:-1]:
        out += [frac] * min(n - len(out), round(share * n))
    out += [groups[-1][1]] * (n - len(out))
    return [out[i] for i in rng.permutation(n)]


def _split_domain(domain: str, labels: np.ndarray, clients: int, scenario: str, num_classes: int,
                  rng: np.random.Generator) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    n = len(labels)
    if n < clients:
        raise HuscfError(f"domain '{domain}' has {n} training samples, fewer than clients_per_domain={clients}")
    if scenario == "iid":
        return [(np.sort(part), ()) for part in np.array_split(rng.permutation(n), clients)]
    (counts, weights), groups = SCENARIOS[scenario]
    p = np.asarray(weights) / np.sum(weights)
    excluded = [tuple(sorted(int(c) for c in rng.choice(num_classes, size=min(int(k), num_classes - 1), replace=False)))
                for k in rng.choice(counts, size=clients, p=p)]
    even = n // clients
    targets = [max(1, int(even * f)) for f in _fractions(clients, groups, rng)]

    taken = np.zeros(n, dtype=bool)
    picked: list[list[np.ndarray]] = [[] for _ in range(clients)]
    order = sorted(range(clients), key=lambda c: -len(excluded[c]))  # most restricted clients draw first

    def draw(c: int, size: int) -> None:
        pool = np.flatnonzero(~taken & ~np.isin(labels, excluded[c]))
        chosen = rng.choice(pool, size=min(size, len(pool)), replace=False)
        taken[chosen] = True
        picked[c].append(chosen)

    for c in order:  # first one sample each, so nobody ends up empty
        draw(c, 1)
        if not len(picked[c][0]):
            raise HuscfError(f"domain '{domain}': client {c} has no samples left outside its excluded classes "
                             f"{list(excluded[c])}; use more data, fewer clients or scenario 'iid'")
    for c in order:
        draw(c, targets[c] - 1)
    return [(np.sort(np.concatenate(picked[c])).astype(np.int64), excluded[c]) for c in range(clients)]


def _split_shards(domain: str, labels: np.ndarray, clients: int, num_classes: int,
                  rng: np.random.Generator) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """``pathological`` (beyond the paper; McMahan et al. 2017's "pathological non-IID"): the domain
    sorted by label and cut into 2 x clients equal shards, two at random per client. Every sample is
    used, sizes differ by at most 2, and a client holds its shards' classes: one or two where a shard
    is no larger than a class, more where shards span class boundaries (few clients per domain)."""
    if len(labels) < 2 * clients:
        raise HuscfError(f"domain '{domain}' has {len(labels)} training samples; scenario 'pathological' needs "
                         f"two per client ({2 * clients})")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]  # random order within a class
    shards = np.array_split(by_label, 2 * clients)
    pick = rng.permutation(2 * clients)
    out = []
    for c in range(clients):
        indices = np.sort(np.concatenate([shards[pick[2 * c]], shards[pick[2 * c + 1]]])).astype(np.int64)
        held = set(np.unique(labels[indices]).tolist())
        out.append((indices, tuple(k for k in range(num_classes) if k not in held)))
    return out


def _split_by_group(domain: str, groups: np.ndarray | None, clients: int,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    if groups is None:
        raise HuscfError(f"scenario 'by_group' needs a domain whose samples come in groups (e.g. fsdd's speakers); "
                         f"'{domain}' has none")
    ids = np.unique(groups)
    if clients < len(ids):
        raise HuscfError(f"scenario 'by_group': domain '{domain}' has {len(ids)} groups, so data.clients_per_domain "
                         f"must be at least {len(ids)}, got {clients}")
    # client c takes group c mod G, and the (c // G)-th of the parts that group's samples are split into
    parts = [np.array_split(rng.permutation(np.flatnonzero(groups == g)), len(range(j, clients, len(ids))))
             for j, g in enumerate(ids)]
    return [(np.sort(parts[c % len(ids)][c // len(ids)]).astype(np.int64), ()) for c in range(clients)]


def partition(labels_by_domain: dict[str, np.ndarray], clients_per_domain: int, scenario: str, seed: int,
              num_classes: dict[str, int] | int = 10,
              groups_by_domain: dict[str, np.ndarray | None] | None = None) -> list[ClientPartition]:
    """Split every domain over ``clients_per_domain`` clients; clients are numbered domain by domain."""
    if scenario not in scenario_names():
        raise HuscfError(f"unknown scenario {scenario!r}; choose one of {', '.join(scenario_names())}")
    if clients_per_domain < 1:
        raise HuscfError(f"clients_per_domain must be >= 1, got {clients_per_domain}")
    out: list[ClientPartition] = []
    for domain, labels in labels_by_domain.items():
        labels = np.asarray(labels, dtype=np.int64)
        if not isinstance(num_classes, int) and domain not in num_classes:
            raise HuscfError(f"num_classes has no entry for domain '{domain}'")
        k = num_classes if isinstance(num_classes, int) else num_classes[domain]
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise HuscfError(f"domain '{domain}': labels must lie in 0..{k - 1}, found {labels.min()}..{labels.max()}")
        rng = domain_rng(seed, domain)
        if scenario == "by_group":
            split = _split_by_group(domain, (groups_by_domain or {}).get(domain), clients_per_domain, rng)
        elif scenario == "pathological":
            split = _split_shards(domain, labels, clients_per_domain, k, rng)
        else:
            split = _split_domain(domain, labels, clients_per_domain, scenario, k, rng)
        out += [ClientPartition(len(out) + j, domain, indices, excluded) for j, (indices, excluded) in enumerate(split)]
    return out


def describe(partitions: list[ClientPartition], labels_by_domain: dict[str, np.ndarray]) -> str:
    """A small table for logs: client, domain, size, excluded classes, class histogram."""
    rows = [("client", "domain", "size", "excluded", "class histogram")]
    for p in partitions:
        labels = np.asarray(labels_by_domain[p.domain])
        hist = np.bincount(labels[p.indices], minlength=int(labels.max()) + 1 if labels.size else 0)
        rows.append((str(p.client_id), p.domain, str(len(p.indices)),
                     ",".join(map(str, p.excluded_classes)) or "-", " ".join(map(str, hist))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)
