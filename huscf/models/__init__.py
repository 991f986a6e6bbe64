"""Models as ordered block lists (see blocks.py) and the architectures huscf ships (cgan.py)."""

from huscf.models.blocks import BlockNet
from huscf.models.cgan import ARCHITECTURES, Architecture, build_architecture

__all__ = ["ARCHITECTURES", "Architecture", "BlockNet", "build_architecture"]
