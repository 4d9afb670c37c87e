"""Hardware-in-the-loop rigs: emulated meters and boards, board drivers, the MicroPython runner."""
