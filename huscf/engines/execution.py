"""How an engine executes the iteration on the hardware: device, precision, memory layout, memory.

None of these change the mathematics of HuSCF-GAN; they change where and how fast it runs:

* ``device``: ``cpu`` or ``cuda`` (the split model and the clients' data move there);
* ``precision``: ``fp32`` (the default), ``bf16`` (forward matmuls and convolutions under
  ``torch.autocast``; weights, optimiser states and losses stay fp32; fast only where the
  hardware computes bf16 natively: ``precision.py``) or ``fp64`` (weights, activations, optimiser
  states and losses in float64: the numerical reference the tests compare engines in, where
  summation order moves results by ~1e-14 instead of ~1e-5; slower). Initial weights, data and
  noise are the fp32 ones cast exactly, so an fp64 run is the same computation as an fp32 one
  with less rounding;
* ``channels_last``: NHWC memory layout for convolutions (oneDNN and cuDNN's fast layout);
* ``recompute_generator``: run the generator forward of the discriminator step without a graph
  and recompute it in the generator step (same noise and weights, so the same fakes), so that no
  client's generator graph stays alive through the discriminator step;
* ``batch_clients``: run every block once for a chunk of ``client_chunk`` clients
  (``BatchedEngine``, vmapped over the clients' weights) instead of once per client;
* ``fold_batch_norm``: with batched clients, run a block's BatchNorm2d as one ``batch_norm`` over
  the clients folded into the channels instead of through vmap's batching rule (the same
  per-client statistics);
* ``client_convs``: with batched clients, how a convolution with one weight per client runs:
  ``vmap`` (grouped convolutions), ``loop`` (one convolution per client) or ``bmm`` (im2col +
  batched matmul; see ``client_ops``);
* ``cudnn_benchmark``: let cuDNN time its algorithms for each new shape (CUDA only);
* ``cuda_graphs``: capture each set of clients' iteration once as a CUDA graph and replay it
  (batched clients on CUDA only): the same kernels, launched from the device.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from huscf.engines.client_ops import CONV_WAYS
from huscf.engines.precision import choose_precision
from huscf.errors import HuscfError

PRECISIONS = ("fp32", "bf16", "fp64")


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of weights, optimiser states and data: float64 for ``fp64``, else float32 (bf16
    casts inside autocast only; ``auto`` resolves to fp32 or bf16)."""
    return torch.float64 if precision == "fp64" else torch.float32


def for_loss(t: torch.Tensor) -> torch.Tensor:
    """An autocast output as the losses and the round end take it: bf16/fp16 upcast to float32,
    float32 and float64 kept (an fp64 run stays fp64 through its losses)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@dataclass(frozen=True, kw_only=True)
class Execution:
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    recompute_generator: bool = False
    batch_clients: bool = False
    client_chunk: int | None = None
    cudnn_benchmark: bool = False
    cuda_graphs: bool = False
    fold_batch_norm: bool = False
    client_convs: str = "vmap"
    # why the precision is what it is (auto's choice, or a warning for emulated bf16): printed in
    # the run's first line, never part of what the engine computes
    precision_note: str = field(default="", compare=False)

    def __post_init__(self):
        # torch.func.vmap cannot query NHWC strides (BatchNorm on CUDA)
        if self.channels_last and self.batch_clients:
            raise HuscfError("compute.channels_last is not supported with batched clients: "
                             "set compute.channels_last to false or 'auto', or compute.clients to 'loop'")
        if self.precision not in PRECISIONS:
            raise HuscfError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise HuscfError("compute.device is 'cuda' but torch sees no CUDA device: use 'cpu' or 'auto'")
        if self.fold_batch_norm and not self.batch_clients:
            raise HuscfError("compute.fold_batch_norm folds batched clients' BatchNorm: it needs compute.clients "
                             "'batched' (the per-client loop normalises each client on its own already)")
        if self.client_convs not in CONV_WAYS:
            raise HuscfError(f"compute.client_convs must be one of {', '.join(CONV_WAYS)}, got {self.client_convs!r}")
        if self.client_convs != "vmap" and not self.batch_clients:
            raise HuscfError("compute.client_convs sets how batched clients' convolutions run: it needs "
                             "compute.clients 'batched'")
        if self.cuda_graphs and (torch.device(self.device).type != "cuda" or not self.batch_clients):
            raise HuscfError("compute.cuda_graphs needs compute.device 'cuda' and compute.clients 'batched' "
                             f"(got device {self.device!r}, clients {'batched' if self.batch_clients else 'loop'!r})")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def autocast(self):
        """The forward-pass context: bf16 autocast, or nothing for fp32 and fp64."""
        if self.precision == "bf16":  # a graph capture cannot keep autocast's cache of cast weights
            return torch.autocast(self.torch_device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)
        return nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the configured memory layout (a no-op unless channels_last)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @classmethod
    def from_config(cls, compute, num_clients: int, *, per_client_loop: bool = False) -> Execution:
        """A config's ``compute`` section, resolved for ``num_clients`` clients. ``per_client_loop``:
        for a process that runs its clients one by one (a Ray client or server actor): no batched
        clients, hence none of the batched-only options."""
        c = compute
        batched = {"clients": "loop"} if per_client_loop else {
            "clients": c.clients, "client_chunk": c.client_chunk, "cuda_graphs": c.cuda_graphs,
            "fold_batch_norm": c.fold_batch_norm, "client_convs": c.client_convs}
        return cls.resolve(device=c.device, precision=c.precision, channels_last=c.channels_last,
                           recompute_generator=c.recompute_generator, num_clients=num_clients,
                           cudnn_benchmark=c.cudnn_benchmark, **batched)

    @classmethod
    def resolve(cls, *, device: str = "auto", precision: str = "fp32", channels_last: bool | str = "auto",
                recompute_generator: bool | str = "auto", clients: str = "auto", client_chunk: int | None = None,
                num_clients: int = 1, cudnn_benchmark: bool = False, cuda_graphs: bool | str = "auto",
                fold_batch_norm: bool | str = "auto", client_convs: str = "vmap") -> Execution:
        """Turn the config's ``auto`` choices into concrete ones (see docs/performance.md)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        precision, note = choose_precision(precision, device)
        on_cuda = torch.device(device).type == "cuda"
        batch = on_cuda if clients == "auto" else clients == "batched"
        if channels_last == "auto":
            channels_last = not batch
        if cuda_graphs == "auto":  # the same kernels, launched from the device: faster at every size measured
            cuda_graphs = on_cuda and batch
        if recompute_generator == "auto":
            # retained generator graphs grow with the clients of an iteration; past a handful of
            # clients on a CPU the memory is worth more than the ~20% extra generator FLOPs
            recompute_generator = (not batch and num_clients > 16) or (batch and client_chunk is not None
                                                                         and client_chunk < num_clients)
        if fold_batch_norm == "auto":  # measured faster on a CPU; not yet measured on a GPU
            fold_batch_norm = batch and not on_cuda
        return cls(device=device, precision=precision, channels_last=bool(channels_last),
                   recompute_generator=bool(recompute_generator), batch_clients=batch, client_chunk=client_chunk,
                   cudnn_benchmark=cudnn_benchmark, cuda_graphs=bool(cuda_graphs),
                   fold_batch_norm=bool(fold_batch_norm), client_convs=client_convs, precision_note=note)
