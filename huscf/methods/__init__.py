"""The training methods: HuSCF-GAN, the baselines and the ablations, each one registered class
(``base``: what a method declares and the registry; ``builtin``: the shipped ones). Run through
the same config, partition, cGAN blocks and evaluation (``method:`` in the config; ``huscf
compare``). See docs/baselines.md."""

from huscf.methods import builtin  # noqa: F401  (registers the shipped methods)
from huscf.methods.base import (
    Method, build_strategy, get_method, method_names, register, secure_policy, unregister,
)

__all__ = ["Method", "build_strategy", "get_method", "method_names", "register", "secure_policy", "unregister"]
