"""The environment of a Flower process, the console scripts it runs, and shell lines a user can paste."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from deploy.errors import DeployError

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Every host is pre-installed: never let the SuperLink `uv sync` the app's dependencies from PyPI at run time.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_env(
    flwr_home: Path | None = None, *, base: Mapping[str, str] | None = None, poll_interval: float | None = None
) -> dict[str, str]:
    """The environment for a Flower process: ``base`` (default ``os.environ``) + :data:`FLOWER_ENV` + FLWR_HOME.

    ``poll_interval`` sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (seconds, Flower's default 1.0): a SuperExec that
    polls faster starts the ServerApp / ClientApp sooner. This environment's ``bin`` folder goes first on PATH,
    because the SuperLink and SuperNode start ``flower-superexec`` (and it ``flwr-serverapp`` / ``flwr-clientapp``)
    by name: without it a non-activated virtual environment fails with "No such file: 'flower-superexec'".
    """
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).absolute())
    if poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = f"{poll_interval:g}"
    return env


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"'{name}' not found: install flwr==1.42.0 in this environment (pip install -e .)")
    return found


def _quote(arg: str) -> str:
    """Shell quoting that stays readable for ``key='value'`` arguments (double quotes when that is safe)."""
    quoted = shlex.quote(arg)
    if quoted != arg and "'" in arg and not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return quoted


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` as one copy-pasteable shell line, prefixed by the variables that differ from ``os.environ``."""
    prefix = []
    path = os.environ.get("PATH", "")
    for key, value in sorted((env or {}).items()):
        if os.environ.get(key) == value:
            continue
        if key == "PATH" and path and value.endswith(os.pathsep + path) and '"' not in value:
            prefix.append(f'PATH="{value[: -len(path)]}$PATH"')  # flower_env put the venv's bin first
        else:
            prefix.append(f"{key}={_quote(value)}")
    return " ".join([*prefix, *(_quote(str(a)) for a in argv)])
