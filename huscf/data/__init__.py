"""Data: IDX files, domains (real and offline), their train/test splits, and the split across clients."""

from huscf.data.idx import read_idx, write_idx
from huscf.data.partition import ClientPartition, describe, partition
from huscf.data.sources import Domain, download, known_domains, load_domain, resolve_data_dir, to_tensor

__all__ = [
    "ClientPartition", "Domain", "describe", "download", "known_domains", "load_domain",
    "partition", "read_idx", "resolve_data_dir", "to_tensor", "write_idx",
]
