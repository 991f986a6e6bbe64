"""Baselines and ablations, run through the same config, partition, cGAN blocks and evaluation as
HuSCF-GAN (``method:`` in the config; ``huscf compare``). See docs/baselines.md."""

from huscf.baselines.methods import ABLATIONS, METHODS, Method, get_method

__all__ = ["ABLATIONS", "METHODS", "Method", "get_method"]
