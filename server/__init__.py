"""The coordinator side: the Flower ServerApp, head aggregation, run records."""
