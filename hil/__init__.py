"""Hardware-in-the-loop rigs: emulated meters and boards, real-board drivers, the MicroPython runner."""
