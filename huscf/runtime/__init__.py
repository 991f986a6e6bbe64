"""The distributed runtime on Ray (``runtime.engine: ray``, ``huscf train --engine ray``).

* ``messages`` - the typed message layer every cross-process payload goes through (privacy rules, audit);
* ``actors`` - ``ClientHost`` (clients' data, segments, optimisers) and ``ServerNode`` (server body, aggregation);
* ``driver`` - ``RayEngine``, the driver: orchestration, faults, stragglers, state for checkpoints;
* ``cluster`` - starting a loopback Ray or joining a cluster;
* ``audit`` - ``huscf audit RUN_DIR``.

Ray is imported only when the ray engine is used (``pip install 'huscf[ray]'``).
"""
