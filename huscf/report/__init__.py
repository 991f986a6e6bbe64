"""``huscf report``: the report's sections built from the run directory (``build``), rendered to
HTML and Markdown (``render``), with matplotlib figures (``plots``)."""
