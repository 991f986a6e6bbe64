"""huscf: HuSCF-GAN, heterogeneous U-shaped split learning with clustered, KLD-weighted federation.

Package map (one folder per concern, data flowing one way):
data -> models -> split -> engine (one iteration, rounds) -> federation (round end) -> metrics.
"""

__version__ = "0.1.0"
