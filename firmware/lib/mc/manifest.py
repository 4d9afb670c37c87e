# pyright: reportUndefinedVariable=false
# ruff: noqa: F821  (makemanifest supplies metadata() and package())
"""Freeze manifest for the `mc` firmware package (micropython-lib style).

Used by a board build (`make BOARD=... FROZEN_MANIFEST=.../mc/manifest.py`, or
`include()`d from a board manifest) and run by MicroPython's makemanifest tool on the
host, which provides `metadata` and `package` and runs this file with the current
directory set to this folder.  Frozen modules execute from flash, so their constants
(strings, tuples) cost no RAM.

Every module of the package is frozen, in subfolders too (e.g. `meters/`): modules added
to the package are picked up without editing this file.  Only this manifest is left out.
"""

import os

metadata(description="MeterChain meter-board firmware", version="0.1.0", license="MIT")


def _modules(folder, prefix):
    found = []
    for name in sorted(os.listdir(folder)):
        path = folder + "/" + name
        if os.path.isdir(path):
            if name != "__pycache__":
                found.extend(_modules(path, prefix + name + "/"))
        elif name.endswith(".py") and prefix + name != "manifest.py":
            found.append(prefix + name)
    return found


package("mc", files=_modules(".", ""), base_path="..")
