# MeterChain meter-board firmware package (MicroPython; also runs under CPython).
