"""Builds the plugin's front (cni/front.c) as a static executable beside the package's
modules, where cni_install puts it in front of the plugin's zip. Run by setup for a
checkout and by the image's build stage: `python3 -m interceptor.cni.front`. The
interpreter it falls back to and the agent's socket name are compiled in from the
modules that own them."""
import os
import subprocess
import sys

from interceptor.cni.install import FRONT, HERE, PYTHON
from interceptor.cni.server import SOCKET_NAME

SOURCE = os.path.join(HERE, "front.c")


def build(source=SOURCE, out=FRONT):
    tmp = f"{out}.tmp-{os.getpid()}"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror",
                    f'-DINTERPRETER="{PYTHON}"', f'-DSOCKET_NAME="{SOCKET_NAME}"',
                    "-o", tmp, source], check=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    try:
        print(f"built {build()}")
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"cni_front: {exc}")
