"""Run cluster.yaml's shell commands on this machine with every outside effect stubbed.

The PATH holds only stubs and a few core tools: `sudo`, `apt-get`, `add-apt-repository`, `mount`,
`mountpoint` and a system `ray` only append to a log. Interpreters are shell scripts around the
current Python: one may claim an older version (Ubuntu 22.04's python3 is 3.10), and `-m venv DIR`
makes a venv of the same interpreter whose `pip` and `ray` only log. Like the real venv module,
re-running `-m venv` over an existing venv keeps its bin/python unless `--clear` is given.
`apt-get install python3.11` puts a python3.11 (the current Python) on the PATH.
"""

import shutil
import subprocess
import sys
from pathlib import Path

BASH = shutil.which("bash") or "/bin/bash"
TOOLS = ("bash", "env", "mkdir", "cp", "rm", "chmod")

SITECUSTOMIZE = """\
import os
import sys

_claimed = os.environ.get("SANDBOX_PYTHON_VERSION")
if _claimed:  # an interpreter that claims an older version
    sys.version_info = (*map(int, _claimed.split(".")), "final", 0)
    sys.version = _claimed + " (sandbox)"
"""

# The ImageNet pre-fill imports this instead of downloading weights.
FAKE_SMP = """\
import os


def create_model(arch, **kwargs):
    with open(os.environ["SANDBOX_LOG"], "a") as log:
        log.write(f"smp.create_model {arch} {sorted(kwargs.items())}\\n")
"""

LOGGING_STUB = """\
#!{bash}
echo "$0 $*" >> "$SANDBOX_LOG"
{body}
"""

STUBS = {
    "sudo": 'case "$1" in apt-get|add-apt-repository|mount|mountpoint) exec "$@";; esac',
    "apt-get": (
        'for pkg in "$@"; do\n'
        '    if [ -e "$SANDBOX_APT/$pkg" ]; then cp "$SANDBOX_APT/$pkg" "$SANDBOX_BIN/$pkg"; fi\n'
        "done"
    ),
    "add-apt-repository": "",
    "mount": "",
    "mountpoint": "exit 1  # nothing is mounted yet",
    "ray": "",  # the image's own ray, not the venv's
}

INTERPRETER = """\
#!{bash}
# Sandbox interpreter: the current Python, claiming version "{claimed}" ("" = its own).
echo "$0 $*" >> "$SANDBOX_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
    shift 2
    clear=
    while [ "${{1#-}}" != "$1" ]; do
        if [ "$1" = --clear ]; then clear=1; fi
        shift
    done
    if [ -n "$clear" ]; then rm -rf "$1"; fi
    mkdir -p "$1/bin"
    if [ ! -e "$1/bin/python" ]; then cp "$0" "$1/bin/python"; fi  # venv keeps an existing one
    for tool in pip ray; do
        printf '#!{bash}\\necho "$0 $*" >> "$SANDBOX_LOG"\\n' > "$1/bin/$tool"
        chmod +x "$1/bin/$tool"
    done
    exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then exit 0; fi
exec env SANDBOX_PYTHON_VERSION="{claimed}" PYTHONPATH="{site}" "{real}" "$@"
"""


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home, self.bin, self.apt, self.site = (
            root / d for d in ("home", "bin", "apt", "site")
        )
        for folder in (self.home, self.bin, self.apt, self.site):
            folder.mkdir(parents=True)
        self.log = root / "log"
        self.log.touch()
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (self.site / "segmentation_models_pytorch.py").write_text(FAKE_SMP)
        for tool in TOOLS:
            found = shutil.which(tool)
            assert found, f"the sandbox needs {tool}"
            (self.bin / tool).symlink_to(found)
        for name, body in STUBS.items():
            self._executable(self.bin / name, LOGGING_STUB.format(bash=BASH, body=body))

    def _executable(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o755)

    def interpreter(self, name: str, claimed: str = "", *, installed: bool = True) -> None:
        """Put `name` on the PATH (or only in the apt archive) as the current Python claiming `claimed`."""
        script = INTERPRETER.format(bash=BASH, claimed=claimed, site=self.site, real=sys.executable)
        self._executable((self.bin if installed else self.apt) / name, script)

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "PATH": str(self.bin),
            "SANDBOX_LOG": str(self.log),
            "SANDBOX_BIN": str(self.bin),
            "SANDBOX_APT": str(self.apt),
            "RAY_HEAD_IP": "10.0.0.1",
        }

    def run(self, commands: list[str]) -> subprocess.CompletedProcess | None:
        """Run each command in its own shell, as Ray does; the first that fails is returned."""
        for command in commands:
            done = subprocess.run(
                [BASH, "-c", command],
                cwd=self.home,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                return done
        return None

    def version(self, python: Path) -> tuple[int, int]:
        """What `python` reports as sys.version_info[:2]."""
        out = subprocess.run(
            [str(python), "-c", "import sys; print(*sys.version_info[:2])"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        major, minor = map(int, out.split())
        return major, minor

    def logged(self) -> list[str]:
        return self.log.read_text().splitlines()


# The paper sweep as a cluster runs it, with the data and RUN_DIR on the storage every node mounts
# at /mnt/shared: README's `ray exec` line for cluster.yaml, and rayjob.yaml's entrypoint.
PAPER_SWEEP_ON_CLUSTER = (
    "corroprune sweep --preset paper --address auto --out /mnt/shared/runs/paper"
    " --data-root sscs=/mnt/shared/data/sscs --data-root nea=/mnt/shared/data/nea"
)
