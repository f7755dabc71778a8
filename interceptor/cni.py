"""`interceptor-cni`: the CNI chained plugin. A stub until the CNI issue: it answers
VERSION and reports every other command as unsupported, in the spec's error format."""
import json
import os
import sys

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


def main():
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        print(json.dumps({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}))
        return 0
    print(json.dumps({"cniVersion": "1.1.0", "code": 4,
                      "msg": f"CNI_COMMAND {command or '(unset)'} is not implemented yet"}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
