"""Builds the plugin as the node agent installs it (front.c) as a static executable
beside it, interceptor/cni/front. Run by setup for a checkout and by the image's build
stage: `python3 -m interceptor.cni.front`. The agent's socket name and the CNI versions
the plugin supports are compiled in from the modules that own them."""
import os
import subprocess
import sys

from interceptor.cni.install import FRONT, HERE
from interceptor.cni.plugin import LATEST, SUPPORTED_VERSIONS
from interceptor.cni.server import SOCKET_NAME

SOURCE = os.path.join(HERE, "front.c")


def build(source=SOURCE, out=FRONT):
    tmp = f"{out}.tmp-{os.getpid()}"
    versions = ", ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
    subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror",
                    f'-DSOCKET_NAME="{SOCKET_NAME}"', f"-DSUPPORTED_VERSIONS={versions}",
                    f'-DLATEST_VERSION="{LATEST}"', "-o", tmp, source], check=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    try:
        print(f"built {build()}")
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"cni.front: {exc}")
