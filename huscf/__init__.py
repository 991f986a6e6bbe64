"""huscf: HuSCF-GAN, heterogeneous U-shaped split learning with clustered, KLD-weighted federation.

Layers, highest first; a module imports only from layers below its own (pyproject.toml's
import-linter contract, checked by the tests):

    cli -> compare -> report -> trainer -> metrics | runtime -> engines -> setup -> config
        -> methods -> federation -> cuts | rundir -> split -> models -> data -> cache | errors

A run flows config -> setup (partition, client data, architecture, cuts) -> an engine (the
iteration: ``engines`` in one process, ``runtime`` on Ray) -> federation (the round end a
method's strategy decides) -> rundir (typed round and evaluation records, checkpoints) ->
metrics, report, compare (which read the run directory back).
"""

__version__ = "0.1.0"
