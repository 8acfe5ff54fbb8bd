"""methods.fedgh on a real Flower deployment (issue #27; skipped without the `fl` extra): the README's
commands on a fresh machine. The once-per-machine step of methods/fedgh/README.md creates the
`local-deployment` SuperLink connection in an empty FLWR_HOME, then a SuperLink and three
SuperNodes on 127.0.0.1 (free ports, the README's flags) and `flwr run methods/fedgh/flower
local-deployment` train 2 rounds, which must give the in-process run's metrics; every process the
test started (and each one these started) is stopped at the end, also on failure."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "methods" / "fedgh" / "README.md"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr (and flower-superexec, by name)
README_SUPERLINK = "127.0.0.1:8000"  # the connection's address in the README
RUN_CONFIG = "num-partitions=3 num-server-rounds=2 lr=0.05"  # digits, 3 clients, 2 rounds (issue #27)


def connection_setup_block() -> str:
    """The README's once-per-machine block (the fenced bash block that adds the connection)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "[superlink.local-deployment]" in b]
    assert len(found) == 1, "methods/fedgh/README.md: one bash block must create [superlink.local-deployment]"
    return found[0]


def fresh_env(tmp_path: Path) -> dict:
    """A fresh machine: empty HOME and FLWR_HOME (the real ~/.flwr is never touched); the
    checkout's root on PYTHONPATH as the README says; this venv's Flower scripts first on PATH;
    one thread per process (so the in-process reference computes the same floats)."""
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("FLWR_", "OMP_", "MKL_"))]:
        del env[k]
    (tmp_path / "home").mkdir()
    env.update(
        HOME=str(tmp_path / "home"),
        FLWR_HOME=str(tmp_path / "home" / ".flwr"),
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        OMP_NUM_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    return env


def free_ports(n: int):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the SuperLink did not listen on port {port} within {timeout} s")


def children() -> dict:
    """{pid: parent pid} of this machine's processes (Linux /proc; empty elsewhere)."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d.name)] = int(fields[1])
    return out


def descendants(roots) -> set:
    tree, found, todo = children(), set(), list(roots)
    while todo:
        p = todo.pop()
        for c, pp in tree.items():
            if pp == p and c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has finished
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_all(procs, extra_pids, timeout: float = 20.0) -> set:
    """Terminate, wait, kill: the processes this test started, then any process they started
    (a SuperExec, a ServerApp or ClientApp process) still running. Returns the pids left."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    # the SuperExecs watch their parent and leave with it (within seconds): terminate any still
    # there, give them the same grace, then kill
    pids = {pid for pid in extra_pids if alive(pid)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = max(deadline, time.monotonic() + 5.0)
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = {pid for pid in pids if alive(pid)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    return {pid for pid in extra_pids if alive(pid)} | {p.pid for p in procs if p.poll() is None}


def in_process_rows(config: dict):
    """The in-process runtime (methods.fedgh.train.Simulation, what `python -m methods.fedgh`
    runs) on the configuration the deployed ServerApp logged, one thread."""
    import torch

    from methods.fedgh.flower_app import config_from_run_config
    from methods.fedgh.train import Simulation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config_from_run_config(config)
        sim = Simulation(cfg)
        return [sim.round(r) for r in range(cfg.rounds)]
    finally:
        torch.set_num_threads(threads)


def test_readme_connection_setup_on_fresh_machine(tmp_path):
    """The README's once-per-machine block creates the `local-deployment` connection in an empty
    FLWR_HOME (beside Flower's default connections), and running it again changes nothing."""
    env = fresh_env(tmp_path)
    for _ in range(2):
        subprocess.run(["bash", "-euc", connection_setup_block()], cwd=ROOT, env=env, check=True, timeout=120)
    config_file = Path(env["FLWR_HOME"]) / "config.toml"
    text = config_file.read_text()
    assert text.count("[superlink.local-deployment]") == 1
    probe = (
        "from flwr.cli.flower_config import read_superlink_connection as r; c = r('local-deployment'); "
        "print(c.address, c.insecure, r().name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True, timeout=120
    ).stdout.split()
    assert out == [README_SUPERLINK, "True", "local"]


@pytest.mark.slow
def test_flower_deployment_reproduces_inprocess_run(tmp_path):
    if not (BIN / "flower-superlink").exists() or not (BIN / "flower-supernode").exists():
        pytest.skip("flower-superlink / flower-supernode not beside this Python")
    env = fresh_env(tmp_path)
    link, *node_ports = free_ports(4)
    # the README's once-per-machine step, with the SuperLink on a free port instead of 8000
    setup = connection_setup_block().replace(README_SUPERLINK, f"127.0.0.1:{link}")
    subprocess.run(["bash", "-euc", setup], cwd=ROOT, env=env, check=True, timeout=120)
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs, files = [], []

    def start(name, cmd):
        f = open(logs / f"{name}.log", "wb")
        files.append(f)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        return procs[-1]

    started = []
    try:
        superlink = start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation"]
            + ["--port", str(link)],
        )
        wait_for_port(link, superlink, timeout=90)
        for i, port in enumerate(node_ports):
            start(
                f"supernode{i}",
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}"]
                + ["--port", str(port), "--node-config", f"partition-id={i} num-partitions=3"],
            )
        t0 = time.monotonic()
        res = subprocess.run(
            [str(BIN / "flwr"), "run", "methods/fedgh/flower", "local-deployment", "--stream"]
            + ["--run-config", f"{RUN_CONFIG} out='{out}'"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,  # about 45 s on an idle 2-core machine; minutes when it is busy
        )
        print(f"flwr run: {time.monotonic() - t0:.1f} s")
        started = descendants(p.pid for p in procs)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Successfully started run" in res.stdout, res.stdout + res.stderr
        assert "raised an exception" not in res.stdout, res.stdout
        config = json.loads((out / "config.json").read_text())["config"]
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    except BaseException:
        for f in files:
            f.flush()
        for p in sorted(logs.iterdir()):
            print(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:])
        raise
    finally:
        started |= descendants(p.pid for p in procs)
        left = stop_all(procs, started)
        for f in files:
            f.close()
        assert not left, f"processes still running after the test: {sorted(left)}"

    assert (config["dataset"], config["num-partitions"], config["num-server-rounds"]) == ("digits", 3, 2)
    assert (config["harmonize"], config["algo"], config["lr"]) == (True, "fedavg", 0.05)
    ref = in_process_rows(config)
    print("deployment:", [(r["test_acc"], r["test_loss"], r["conflicts"]) for r in rows])
    print("in-process:", [(r["test_acc"], r["test_loss"], r["conflicts"]) for r in ref])
    assert [r["round"] for r in rows] == [0, 1]
    for got, exp in zip(rows, ref):
        keys = ("clients", "dropped", "pairs")
        assert [got[k] for k in keys] == [exp[k] for k in keys] == [3, 0, 3]
        assert got["conflicts"] == exp["conflicts"]
        for k in ("test_acc", "test_loss", "train_loss"):  # same seeds, same threads: the same floats
            assert got[k] == pytest.approx(exp[k], rel=1e-9, abs=1e-12), k
