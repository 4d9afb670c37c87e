"""Ledger data structures: blocks, Merkle trees, chain verification and stores."""
