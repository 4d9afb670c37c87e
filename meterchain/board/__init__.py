"""Field tooling for meter boards: firmware build, provisioning, deploy, monitor, emulated boards.

`meterchain board ...` (cli.py) drives a real ESP32 through mpremote or an emulated
board (a local folder standing in for the board's flash, with the same firmware
running under CPython) through the same steps; see driver.py.
"""
