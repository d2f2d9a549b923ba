"""Start a Flower SuperLink and SuperNodes on 127.0.0.1, run the lightning-metafed Flower app with
`flwr run`, and always stop every process. Used by test_flower.py (and handy by hand).

python tests/scale/flower_deploy.py CONFIG.yaml ROUNDS OUT.pt WORKDIR
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def deploy(config: str, rounds: int, out: Path, workdir: Path, nodes: int = 2, timeout: float = 600.0) -> str:
    """Run the app on a fresh local deployment; returns the `flwr run` output."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr_home"
    home.mkdir(exist_ok=True)
    link_port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    # The SuperLink and SuperNodes start `flower-superexec` and app processes from PATH.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONWARNINGS": "ignore", "PATH": path}
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        handle = open(workdir / log, "w")
        proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
        processes.append(proc)
        return proc

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--port", str(link_port), "--database", ":flwr-in-memory:"], "superlink.log")
        wait_for_port(link_port)
        for p in range(nodes):
            start(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(free_port()),
                 "--node-config", f"partition-id={p} num-partitions={nodes}"],
                f"supernode{p}.log",
            )
        run_config = f'config="{config}" rounds={rounds} output="{out}" num-nodes={nodes}'
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "flower_app"), "local", "--stream", "--run-config", run_config],
            env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0 or not out.exists():
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(workdir.glob("*.log")))
            raise RuntimeError(f"flwr run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}\n{logs}")
        return result.stdout
    finally:
        stop(processes)


def stop(processes: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM every process group (each server and its app subprocesses), wait until the groups
    are empty, SIGKILL what is left."""
    for proc in processes:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so only live members keep the group
            if not _group_alive(proc.pid):
                break
            time.sleep(0.2)
        if _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

if __name__ == "__main__":
    print(deploy(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).resolve(), Path(sys.argv[4]).resolve()))
