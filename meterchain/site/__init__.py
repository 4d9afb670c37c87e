"""A market site of real processes: `site init|up|down`, regulator commands and the market clock."""
