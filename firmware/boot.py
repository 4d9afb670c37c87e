"""Runs at every boot, soft resets included: kept tiny so a broken app can never lock out the REPL."""

import gc

gc.collect()
