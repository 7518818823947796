#!/usr/bin/env python3
"""Set everything up, then run Carlos or its tests. Needs nothing but Python 3.

    python3 dev.py run     # the product: migrations, simulator, pools warmed, http://127.0.0.1:8000/
    python3 dev.py test    # ruff, mypy on the engine, then the whole test suite (extra
                           # arguments go to pytest)

It finds Python 3.13 (this interpreter, `python3.13` on PATH, or pyenv), makes `.venv`,
installs the pinned dependencies from `requirements.lock`, and re-installs only when
`pyproject.toml` or the lock file changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
WANTED = (3, 13)
VENV_PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".carlos-installed"


def find_python() -> str:
    if sys.version_info[:2] == WANTED:
        return sys.executable
    name = f"python{WANTED[0]}.{WANTED[1]}"
    candidates = [shutil.which(name)]
    pyenv = shutil.which("pyenv")
    if pyenv:
        found = subprocess.run(
            [pyenv, "which", name], capture_output=True, text=True, check=False
        ).stdout.strip()
        candidates.append(found)
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        if root:
            candidates += sorted(
                str(p / "bin/python")
                for p in Path(root, "versions").glob(f"{WANTED[0]}.{WANTED[1]}*")
            )
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit(
        f"Carlos needs Python {WANTED[0]}.{WANTED[1]}; install it (e.g. `pyenv install 3.13`)."
    )


def fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "requirements.lock"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    if VENV_PYTHON.exists():
        version = subprocess.run(
            [str(VENV_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if version != str(WANTED):
            shutil.rmtree(VENV)
    if not VENV_PYTHON.exists():
        print(f"Creating {VENV.name} ...", flush=True)
        subprocess.run([find_python(), "-m", "venv", str(VENV)], check=True)
    if STAMP.exists() and STAMP.read_text() == fingerprint():
        return
    print("Installing pinned dependencies ...", flush=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.lock")], check=True, cwd=ROOT)
    subprocess.run([*pip, "--no-deps", "-e", ".[test]"], check=True, cwd=ROOT)
    STAMP.write_text(fingerprint())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test"}:
        print(__doc__)
        return 2
    ensure_venv()
    python = str(VENV_PYTHON)
    env = dict(os.environ)
    if argv[0] == "run":
        env.setdefault("DJANGO_DEBUG", "1")
        manage = [python, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "--verbosity", "0"], check=True, cwd=ROOT, env=env)
        server = subprocess.Popen([*manage, "serve", *argv[1:]], cwd=ROOT, env=env)
        # A SIGTERM to this script (a supervisor, `timeout`) stops the server cleanly too.
        signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
        # Ctrl-C reaches the server too (same process group), which then closes its pools and
        # its simulator: wait for that however often it is pressed, or the shell would come
        # back while the server still holds the port and writes to the terminal.
        while True:
            try:
                return server.wait()
            except KeyboardInterrupt:
                continue
    for check in (["ruff", "check", "."], ["mypy", "pools/engine"]):
        done = subprocess.run([python, "-m", *check], cwd=ROOT, env=env)
        if done.returncode:
            return done.returncode
    return subprocess.run([python, "-m", "pytest", *argv[1:]], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
