"""The edge agent: the service on each microgrid controller (ingest, bid, consensus)."""
