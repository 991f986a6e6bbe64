"""Models as ordered block lists (see blocks.py) and the architectures huscf ships (cgan.py)."""

from huscf.models.blocks import BlockNet, run_tail_block, takes_label
from huscf.models.cgan import ARCHITECTURES, LABEL_PLACES, Architecture, build_architecture

__all__ = ["ARCHITECTURES", "LABEL_PLACES", "Architecture", "BlockNet", "build_architecture", "run_tail_block",
           "takes_label"]
