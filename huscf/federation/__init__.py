"""Round-end federation: cluster clients (clustering), score them (weights), decide the
averaging weights (strategies) and average client segments and the server body (averaging)."""
