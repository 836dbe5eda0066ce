"""Install scripts/torchvision_cpu_shim.py into the running virtualenv iff torchvision fails to import beside torch.

Run by `make test`/`make bench` setup. Prints what it found and did; exits non-zero if torchvision still fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SHIM = Path(__file__).with_name("torchvision_cpu_shim.py")


def import_error() -> str:
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["unknown error"])[-1]


def main() -> int:
    err = import_error()
    if not err:
        print("torchvision imports fine: no shim needed")
        return 0
    if "torchvision::nms" not in err:
        print(f"torchvision fails to import for another reason: {err}", file=sys.stderr)
        return 1
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(SHIM, site / "_mmcompress_torchvision_shim.py")
    (site / "_mmcompress_torchvision_shim.pth").write_text("import _mmcompress_torchvision_shim as m; m.install()\n")
    err = import_error()
    print("CUDA torchvision beside CPU torch detected: shim installed in", site, "->", err or "imports fine now")
    return 1 if err else 0


if __name__ == "__main__":
    sys.exit(main())
