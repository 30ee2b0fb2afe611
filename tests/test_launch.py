"""launch/: the scripts parse, and a smoke job submitted to a 2-node loopback cluster trains."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
# The jobs these tests run: a model small enough for a 2-CPU test cluster.
TINY_MODEL = {
    "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
}
REPO = LAUNCH.parent


@pytest.mark.parametrize("script", ["local.sh", "submit.sh", "job_entrypoint.sh", "slurm.sbatch"])
def test_launch_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


@pytest.mark.parametrize("script", ["local.sh", "submit.sh", "job_entrypoint.sh"])
def test_launch_script_is_executable(script):
    assert os.access(LAUNCH / script, os.X_OK)


def test_submit_without_a_cluster_address_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [str(LAUNCH / "submit.sh"), "configs/smoke.yaml"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "RAY_ADDRESS" in result.stderr


def test_kuberay_rayjob_runs_forge_train_on_a_ray_cluster_spec():
    job = yaml.safe_load((LAUNCH / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "forge" in job["spec"]["entrypoint"] and " train " in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) > 0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class RayStartExited(RuntimeError):
    pass


class LoopbackCluster:
    """A head and a worker node on this machine, each a `ray start --block` process group.

    Its own temp dir keeps it from being found by `ray.init()` elsewhere (that looks in
    /tmp/ray), and `stop` ends only the processes it started, never `ray stop`."""

    def __init__(self, cpus_per_node: int, attempts: int = 3) -> None:
        # The ports are free when picked but may be taken before `ray start` binds them (and
        # `ray start` then exits): a new set of ports each attempt.
        for attempt in range(attempts):
            try:
                self.start_nodes(cpus_per_node)
                return
            except RayStartExited:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def start_nodes(self, cpus_per_node: int) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: unix socket paths
        self.processes: list[subprocess.Popen] = []
        (gcs, self.dashboard_port, *agent_ports) = free_ports(11)
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster
        # A `ray start --block` node given SIGTERM first asks the GCS to drain it, for up to
        # 30 s; `stop` ends the GCS in the same moment, so each node waited out all 30 s
        # (a test of 72 s). Nothing of this cluster needs draining.
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        self.gcs = f"127.0.0.1:{gcs}"
        common = [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus_per_node}",
            "--num-gpus=0",
            "--disable-usage-stats",
            "--block",
        ]
        head = [
            "ray",
            "start",
            "--head",
            f"--port={gcs}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={agent_ports[0]}",
            *self.node_ports(agent_ports[1:5]),
            *common,
        ]
        worker = ["ray", "start", f"--address={self.gcs}", *self.node_ports(agent_ports[5:9]), *common]
        self.processes = [self.start(head)]
        self.wait_for_nodes(1)
        self.processes.append(self.start(worker))
        self.wait_for_nodes(2)

    @staticmethod
    def node_ports(ports: list[int]) -> list[str]:
        return [
            f"--dashboard-agent-listen-port={ports[0]}",
            f"--dashboard-agent-grpc-port={ports[1]}",
            f"--metrics-export-port={ports[2]}",
            f"--runtime-env-agent-port={ports[3]}",
        ]

    def start(self, command: list[str]) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"ray-start-{len(self.processes)}.log", "w")  # noqa: SIM115
        with log:
            return subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_for_nodes(self, count: int, timeout_s: float = 180) -> None:
        script = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    log = (Path(self.temp_dir) / f"ray-start-{index}.log").read_text()[-2000:]
                    raise RayStartExited(f"ray start exited ({process.returncode}):\n{log}")
            try:  # ray.init waits long for a GCS that is not up (or never will be)
                result = subprocess.run(
                    [sys.executable, "-c", script, self.gcs],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise TimeoutError(f"the loopback cluster did not reach {count} nodes")

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        # Anything of this cluster that left the process groups (by its session dir or address).
        for marker in (self.temp_dir, self.gcs.split(":")[1]):
            listed = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
            for pid in map(int, listed):
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


@pytest.mark.slow
def test_a_smoke_job_submitted_to_a_two_node_loopback_cluster_trains(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "env": {"name": "guess_number", "kwargs": {"n": 4}},
                # 1 CPU per node: the trainer takes one node's CPU, so the workers must run on the other.
                "rollout": {
                    "num_workers": 2,
                    "tasks_per_step": 2,
                    "group_size": 2,
                    "max_turns": 2,
                    "max_new_tokens": 1,
                    "num_cpus_per_worker": 0.5,
                },
                # Two steps of 4 one-token episodes may all score alike: this tests the launch, not learning.
                "train": {
                    "max_steps": 2,
                    "num_cpus": 1,
                    "checkpoint_every": 1,
                    "max_steps_without_signal": 0,
                },
                "logging": {"progress_bar": False, "tensorboard": False},
            }
        )
    )
    output = tmp_path / "run"
    cluster = LoopbackCluster(cpus_per_node=1)
    try:
        env = dict(cluster.env, RAY_ADDRESS=f"http://127.0.0.1:{cluster.dashboard_port}")
        result = subprocess.run(
            [str(LAUNCH / "submit.sh"), str(config), "--output-dir", str(output)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.stop()
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (output / "final" / "config.json").is_file()
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-000002"


def tiny_job(path: Path) -> Path:
    """A one-step job small enough for a 2-CPU test cluster."""
    path.write_text(
        yaml.safe_dump(
            {
                "model": TINY_MODEL,
                "env": {"name": "guess_number", "kwargs": {"n": 4}},
                "rollout": {
                    "num_workers": 1,
                    "tasks_per_step": 2,
                    "group_size": 2,
                    "max_turns": 2,
                    "max_new_tokens": 1,
                    "num_cpus_per_worker": 0.5,
                },  # fmt: skip
                "train": {"max_steps": 1, "num_cpus": 1, "max_steps_without_signal": 0},
                "logging": {"progress_bar": False, "tensorboard": False},
            }
        )
    )
    return path


@pytest.mark.slow
def test_a_run_on_a_machine_where_ray_start_runs_a_token_auth_cluster_joins_it(tmp_path):
    """`forge train` on a cluster's head node (RAY_ADDRESS unset) joins the cluster `ray start`
    runs there, as Ray itself would, with its token auth (Ray 2.5x turns that on where a token
    is found); it failed with Ray's "num_cpus must not be provided" traceback. Naming the
    address without RAY_AUTH_MODE=token is a one-line error saying so."""
    ray_tmp = tempfile.mkdtemp(prefix="fj", dir="/tmp")  # short: unix socket paths
    (gcs, *ports) = free_ports(7)
    token = "ab" * 32
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base |= {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
            f"--ray-client-server-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}",
            f"--dashboard-agent-grpc-port={ports[2]}",
            f"--metrics-export-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
        ],  # fmt: skip
        env=base | {"RAY_AUTH_MODE": "token"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    job = tiny_job(tmp_path / "job.yaml")
    forge = [sys.executable, "-m", "forge.cli", "train", str(job)]
    runs = {"pythonpath": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        recorded = Path(ray_tmp) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not recorded.is_file() and time.monotonic() < deadline:
            assert head.poll() is None, "ray start exited"
            time.sleep(1)
        joined = subprocess.run(
            [*forge, "--output-dir", str(tmp_path / "joined")],
            env=base | {"PYTHONPATH": runs["pythonpath"]},
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        address = recorded.read_text().strip()  # the head's own: the machine's address, port `gcs`
        # Ray retries a refused connection once a second, 20 times by default; 2 say the same.
        named = subprocess.run(
            [*forge, "--output-dir", str(tmp_path / "named")],
            env=base | {"PYTHONPATH": runs["pythonpath"], "RAY_ADDRESS": address, "RAY_gcs_server_port_wait_time_s": "2"},
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        # What the error says to do is what joins: the address named, with the token mode on.
        with_token = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print(ray.cluster_resources()['CPU'])"],
            env=base | {"RAY_AUTH_MODE": "token"}, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        listed = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
        for pid in map(int, listed):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert f"joining the Ray cluster `ray start` runs on this machine ({address})" in joined.stderr
    assert address.endswith(f":{gcs}")
    assert (tmp_path / "joined" / "final" / "config.json").is_file()
    assert named.returncode == 2, named.stderr[-3000:]
    assert f"forge: could not join the Ray cluster at {address}" in named.stderr
    assert "RAY_AUTH_MODE=token" in named.stderr and "Traceback" not in named.stderr
    assert with_token.returncode == 0 and with_token.stdout.split()[-1] == "2.0", with_token.stderr[-2000:]
