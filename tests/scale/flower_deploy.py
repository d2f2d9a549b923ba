"""Start a Flower SuperLink and SuperNodes on 127.0.0.1, run the lightning-metafed Flower app with
`flwr run`, and always stop every process. Used by test_flower*.py (and handy by hand).

:func:`run_in_process` runs the same ServerApp loop and ClientApp in this process instead, over a
:class:`LoopbackGrid` (no SuperLink, no subprocesses), for tests that need to see every message.

python tests/scale/flower_deploy.py CONFIG.yaml ROUNDS OUT.pt WORKDIR [KEY=VALUE ...]

Extra ``KEY=VALUE`` pairs (TOML values) go to the run config, e.g. ``secure-aggregation=true``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def deploy(
    config: str, rounds: int, out: Path, workdir: Path, nodes: int = 2, timeout: float = 600.0, run_config: Sequence[str] = ()
) -> str:
    """Run the app on a fresh local deployment; returns the `flwr run` output. ``run_config``: extra
    ``key=value`` pairs (TOML values) for the app's run config, e.g. ``["secure-aggregation=true"]``."""
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
        run_config_line = " ".join([f'config="{config}" rounds={rounds} output="{out}" num-nodes={nodes}', *run_config])
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "flower_app"), "local", "--stream", "--run-config", run_config_line],
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

class LoopbackGrid:
    """A Flower ``Grid`` that delivers each message to ``client_app`` in this process, one
    ``Context`` per node (node ``1000 + p`` has ``partition-id = p``), through a protobuf round
    trip each way as on the wire. ``received`` records every reply the server gets. ``fail(node,
    message)`` returning true makes that node drop out of that message: it replies with an error,
    as a SuperNode does when its ClientApp raises (and so does a ClientApp that raises here)."""

    def __init__(self, client_app: Any, run_config: dict, partitions: Sequence[int], fail: Callable[[int, Any], bool] | None = None):
        from flwr.app import Context, RecordDict

        self.client_app, self.fail, self.received = client_app, fail, []
        config = {"num-partitions": len(partitions)}
        self.contexts = {
            1000 + p: Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p, **config}, state=RecordDict(), run_config=run_config)
            for p in partitions
        }

    def get_node_ids(self) -> list[int]:
        """The nodes' ids."""
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Deliver each message in turn and return the replies (after their trip back)."""
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = _wire(self._deliver(_wire(msg)))
            self.received.append(reply)
            replies.append(reply)
        return replies

    def _deliver(self, msg: Any) -> Any:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode

        node = msg.metadata.dst_node_id
        try:
            if self.fail is not None and self.fail(node, msg):
                raise RuntimeError(f"node {node} dropped out")
            return self.client_app(msg, self.contexts[node])
        except Exception as ex:  # what a SuperNode replies when its ClientApp raises
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)


def _wire(message: Any) -> Any:
    from flwr.common import serde

    return serde.message_from_proto(serde.message_to_proto(message))


def run_in_process(
    run_config: dict, partitions: Sequence[int], fail: Callable[[int, Any], bool] | None = None
) -> tuple[dict, LoopbackGrid, list[str]]:
    """The ServerApp's loop (``lightning_metafed.flower_server.run_server``) with the app's
    ClientApp over a :class:`LoopbackGrid`; returns its result, the grid and the logged lines."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from lightning_metafed.flower_server import run_server

    sys.path.insert(0, str(ROOT / "flower_app"))
    from metafed_flower.client_app import app as client_app

    grid, lines = LoopbackGrid(client_app, run_config, partitions, fail), []
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id  # what the ServerApp process sets
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    try:
        result = run_server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config), lines.append)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return result, grid, lines


if __name__ == "__main__":
    print(deploy(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).resolve(), Path(sys.argv[4]).resolve(), run_config=sys.argv[5:]))
