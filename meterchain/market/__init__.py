"""Market contracts: pure, deterministic rules every node executes (no I/O)."""
