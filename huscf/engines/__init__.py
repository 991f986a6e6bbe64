"""The engines that run HuSCF-GAN's iteration in one process (``runtime`` holds the Ray one).

* ``protocol`` - ``Engine``: what the trainer asks of every engine;
* ``simulation`` - ``SimulationEngine``: a loop over clients, the reference numerics;
* ``batched`` - ``BatchedEngine``: each block once per chunk of clients (``client_ops``: its layers);
* ``execution`` - device, precision, memory layout and the other ways of running the same maths;
* ``precision`` - whether the hardware runs bf16 natively, and what ``precision: auto`` picks;
* ``threads`` - torch's thread count (following the machine's load, or fixed), and independent
  runs in parallel processes sized to the cores (``huscf compare``, benchmarks).
"""
