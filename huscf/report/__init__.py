"""``huscf report``: the run read from its directory (``run``), its sections (``sections``) assembled by
``build``, rendered to HTML and Markdown (``render``), with matplotlib figures (``plots``)."""
