"""Static checks of the deployment files: Dockerfiles, compose file, Kubernetes manifests.

No container engine, GPU or cluster is available here (docs/deploy.md lists what that leaves
unrun). What runs instead:

* hadolint (with its ShellCheck pass) on the three Dockerfiles, failing on any finding;
* checkov's Kubernetes and Dockerfile policies, once per module;
* strict schema validation of every core Kubernetes object (kubernetes-validate) for the oldest
  and newest Kubernetes versions we claim; the KubeRay RayJob (a CRD neither validator knows) by
  its pod templates, validated and scanned as core objects, and structurally;
* cross-checks that the files agree with one another, with the builder, ``edje serve`` and
  ``edje api`` command lines, with the repository the GPU image bakes, and with docs/deploy.md;
* the Prometheus-adapter rule's metric names, and the images' HEALTHCHECK command, against the
  real tritonserver 2.51 (the release the GPU image's container 24.10 ships); the API image's
  HEALTHCHECK against the real ``edje api`` in front of it.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import textwrap
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format
from packaging.requirements import Requirement
from tritonclient.grpc import model_config_pb2

from edje.build_repo import RepoSettings, build_repository
from edje.build_repo import parse_args as build_repo_args
from edje_client.cli import build_parser as edje_cli

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DOCS = ROOT / "docs" / "deploy.md"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
# The HTTP API's image (`edje api`, no Triton, no torch): linted and scanned like the others,
# checked by the test_api_* tests below.
API_DOCKERFILE = DOCKER / "Dockerfile.api"
ALL_DOCKERFILES = {**DOCKERFILES, "api": API_DOCKERFILE}
# The `api` extra: what Dockerfile.api installs beyond the client, pinned in constraints.txt.
API_PACKAGES = ("fastapi", "uvicorn", "python-multipart", "prometheus-client")
# What the API image must never carry: the exporter's stack.
NOT_IN_API_IMAGE = ("torch", "transformers", "onnx", "nvidia-pytriton")
BIN = Path(sys.executable).parent

# The path the Deployment mounts the token bank at, and the GPU image is built for.
BANK_PATH = "/data/token-bank"
# Oldest and newest Kubernetes releases the manifests are validated against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# ONNX Runtime 1.19 in Triton container 24.10 reads ONNX IR <= 10 and opsets <= 21.
MAX_IR_VERSION, MAX_OPSET = 10, 21
# Checkov findings the manifests suppress inline (checkov.io/skipN annotations, with a reason).
ALLOWED_CHECKOV_SKIPS = {
    "CKV_K8S_43",  # image digests: only known once the image is pushed
    "CKV_K8S_35",  # object-store keys as env vars: Lance reads them nowhere else (optional Secret)
}
# Manifests applied on their own, not through kustomization.yaml, and why.
STANDALONE = {"ray-index-job.yaml": "a KubeRay RayJob: needs the operator's CRD, and is a run"}
# Custom resources kubernetes-validate has no schema for, and what checks them instead.
CUSTOM_KINDS = {
    "Kustomization": "test_every_object_is_namespaced_and_listed_in_the_kustomization",
    "ServiceMonitor": "test_service_servicemonitor_and_network_policy_agree",
    "RayJob": "test_ray_index_job (its pod templates: as core objects, with checkov)",
}


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: pip install -e '.[dev]' (or make setup)")
    return str(path)


# --------------------------------------------------------------------------------------------
# Parsing helpers


def dockerfile_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``{stage name: [(INSTRUCTION, arguments), ...]}``; continuation lines joined."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        instruction, _, args = logical.partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            image, _, name = args.partition(" AS ")
            current = stages.setdefault(name.strip() or image.strip(), [])
        current.append((instruction, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT (after any HEALTHCHECK options)."""
    return json.loads(args[args.index("[") :])


def k8s_documents() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s_object(kind: str, name: str | None = None) -> dict:
    (doc,) = [
        d
        for _, d in k8s_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def pod_spec() -> dict:
    return k8s_object("Deployment", "edje-triton")["spec"]["template"]["spec"]


def server_container() -> dict:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "tritonserver"]
    return container


def api_container() -> dict:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "edje-api"]
    return container


def api_image_command(args: list[str] | None = None) -> list[str]:
    """What the API image runs: its ENTRYPOINT, then ``args`` (default: its CMD), as a
    container runtime joins them."""
    (stage,) = dockerfile_stages(API_DOCKERFILE).values()
    entrypoint = exec_form(instructions(stage, "ENTRYPOINT")[-1])
    return entrypoint + (exec_form(instructions(stage, "CMD")[-1]) if args is None else args)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def ray_pod_templates() -> dict[str, dict]:
    """The RayJob's pod templates by role: the submitter, the head and each worker group."""
    spec = k8s_object("RayJob")["spec"]
    cluster = spec["rayClusterSpec"]
    templates = {"submitter": spec["submitterPodTemplate"]}
    templates["head"] = cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        templates[f"worker-{group['groupName']}"] = group["template"]
    return templates


def ray_pods_as_jobs() -> list[dict]:
    """Each RayJob pod template as a batch/v1 Job, with the RayJob's checkov annotations: the
    core objects the validators know (KubeRay adds the command, probes and restart policy)."""
    rayjob = k8s_object("RayJob")
    jobs = []
    for role, template in ray_pod_templates().items():
        template = json.loads(json.dumps(template))
        template["spec"].setdefault("restartPolicy", "Never")
        metadata = {
            "name": f"{rayjob['metadata']['name']}-{role}",
            "namespace": rayjob["metadata"]["namespace"],
            "annotations": rayjob["metadata"].get("annotations", {}),
        }
        jobs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": metadata,
                "spec": {"template": template},
            }
        )
    return jobs


def project_requirements(extra: str = "") -> dict[str, Requirement]:
    """pyproject.toml's requirements (``extra``: that optional group's), by distribution name."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["optional-dependencies"].get(extra, []) if extra else project["dependencies"]
    return {(r := Requirement(line)).name.lower(): r for line in lines}


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def prometheus_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(metric, labels): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


# --------------------------------------------------------------------------------------------
# Linters and validators


@pytest.mark.parametrize("flavour", sorted(ALL_DOCKERFILES))
def test_hadolint_finds_nothing(flavour):
    """hadolint (and the ShellCheck it runs on RUN lines): any finding, even style, fails."""
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", ALL_DOCKERFILES[flavour]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def checkov(tmp_path_factory) -> dict[str, dict]:
    """Checkov's Kubernetes and Dockerfile scans (run once, side by side: a few seconds each).

    Checkov skips a RayJob (a CRD): ``rayjob`` scans its pod templates as Jobs, next to the
    file's other objects (its NetworkPolicy).
    """
    common = ["--skip-download", "--output", "json"]  # --skip-download: no network calls
    ray_dir = tmp_path_factory.mktemp("checkov_rayjob")
    others = [
        d
        for d in yaml.safe_load_all((K8S / "ray-index-job.yaml").read_text())
        if d["kind"] != "RayJob"
    ]
    (ray_dir / "ray-index-job-pods.yaml").write_text(
        yaml.safe_dump_all(ray_pods_as_jobs() + others)
    )
    runs = {
        "kubernetes": ["-d", str(K8S), "--framework", "kubernetes"],
        "rayjob": ["-d", str(ray_dir), "--framework", "kubernetes"],
        "dockerfile": [
            *(arg for path in ALL_DOCKERFILES.values() for arg in ("-f", str(path))),
            "--framework",
            "dockerfile",
        ],
    }
    procs = {
        kind: subprocess.Popen(
            [_tool("checkov"), *args, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for kind, args in runs.items()
    }
    reports = {}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert out.strip(), f"checkov {kind} printed nothing:\n{err[-3000:]}"
        reports[kind] = json.loads(out)
    return reports


def _findings(report: dict) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]


def test_checkov_kubernetes(checkov):
    report = checkov["kubernetes"]
    assert report["summary"]["parsing_errors"] == 0
    assert _findings(report) == []
    _check_skips(report)
    # Every object was parsed (checkov also counts the pods it derives from the workloads), and
    # the workloads, where nearly all its policies apply, were checked.
    assert report["summary"]["resource_count"] >= len(k8s_documents())
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert {"deployment.yaml", "seed-model-repository-job.yaml", "service.yaml"} <= scanned


def _check_skips(report: dict) -> None:
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} <= ALLOWED_CHECKOV_SKIPS
    assert all(c["check_result"].get("suppress_comment", "").strip() for c in skipped)


def test_checkov_ray_index_job_pods(checkov):
    """The RayJob's pod templates pass checkov's workload policies (as Jobs, see the fixture)."""
    report = checkov["rayjob"]
    assert report["summary"]["parsing_errors"] == 0
    assert _findings(report) == []
    _check_skips(report)
    scanned = {c["resource"] for c in report["results"]["passed_checks"]}
    for job in ray_pods_as_jobs():
        assert f"Job.edje.{job['metadata']['name']}" in scanned


def test_checkov_dockerfiles(checkov):
    report = checkov["dockerfile"]
    assert report["summary"]["parsing_errors"] == 0
    assert _findings(report) == []
    assert report["results"]["skipped_checks"] == []
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert scanned == {p.name for p in ALL_DOCKERFILES.values()}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schema(version):
    """Every core object is valid, strictly (an unknown or misspelt field fails); a RayJob's pod
    templates too, as the Jobs of ``ray_pods_as_jobs``."""
    import kubernetes_validate

    checked = 0
    derived = [(K8S / "ray-index-job.yaml", job) for job in ray_pods_as_jobs()]
    for path, doc in k8s_documents() + derived:
        if doc["kind"] in CUSTOM_KINDS:  # no schema here: see CUSTOM_KINDS for their checks
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']} (Kubernetes {version}): {exc.message}")
        checked += 1
    assert checked >= 14


# --------------------------------------------------------------------------------------------
# Kubernetes manifests: what docs/deploy.md promises


def test_every_object_is_namespaced_and_listed_in_the_kustomization():
    kustomization = k8s_object("Kustomization")
    assert sorted(kustomization["resources"]) == sorted(
        p.name
        for p in K8S.glob("*.yaml")
        if p.name != "kustomization.yaml" and p.name not in STANDALONE
    )
    # The others are applied by name, and docs/deploy.md says how.
    for name in STANDALONE:
        assert (K8S / name).is_file() and f"kubectl apply -f deploy/k8s/{name}" in DOCS.read_text()
    for path, doc in k8s_documents():
        if doc["kind"] not in ("Kustomization", "Namespace"):
            assert doc["metadata"]["namespace"] == "edje", path.name
    # The images kustomize rewrites are the ones the pods run: the GPU image everywhere but the
    # API container, which runs the API image.
    images = {i["name"]: i for i in kustomization["images"]}
    assert set(images) == {"edje-triton-gpu", "edje-api"}
    pods = [pod_spec(), k8s_object("Job")["spec"]["template"]["spec"]]
    for spec in pods:
        for container in spec.get("initContainers", []) + spec["containers"]:
            want = "edje-api" if container["name"] == "edje-api" else "edje-triton-gpu"
            name, _, tag = container["image"].partition(":")
            assert name == want and tag == images[want]["newTag"], container["name"]


def test_probes_ports_and_resources():
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe")}
    probes["livenessProbe"] = container["livenessProbe"]["httpGet"]
    assert {k: (v["path"], v["port"]) for k, v in probes.items()} == {
        "startupProbe": ("/v2/health/ready", "http"),
        "readinessProbe": ("/v2/health/ready", "http"),
        "livenessProbe": ("/v2/health/live", "http"),
    }
    # The startup probe is sized for a warm start (engines on the trt-cache volume); the GPU
    # image's HEALTHCHECK keeps the longer start period of a plain `docker run`, which may build
    # them (test_startup_probe_budget_is_the_documented_one checks the number).
    startup = container["startupProbe"]
    (healthcheck,) = instructions(dockerfile_stages(DOCKERFILES["gpu"])["runtime"], "HEALTHCHECK")
    start_period = re.search(r"--start-period=(\d+)m", healthcheck)
    assert startup["periodSeconds"] * startup["failureThreshold"] <= 60 * int(start_period[1])

    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])
    assert resources["requests"]["memory"] == resources["limits"]["memory"]

    # The server drains for --exit-timeout-secs after the preStop pause; both fit the grace.
    exit_timeout = int(next(a for a in container["args"] if "exit-timeout" in a).split("=")[1])
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec()["terminationGracePeriodSeconds"] >= pause + exit_timeout


def test_api_container_probes_ports_and_command():
    """The API container: ``edje api`` on all the pod's interfaces at 8080, Triton on the pod's
    loopback, probes on /health, the key from an optional Secret."""
    from edje_client.api.server import GRACEFUL_SECONDS
    from edje_client.api.settings import API_KEY_ENV, DEFAULT_HOST

    container = api_container()
    assert "command" not in container  # the image's ENTRYPOINT runs, with these args as CMD
    command = api_image_command(container["args"])
    assert command[:2] == ["edje", "api"]
    args = edje_cli().parse_args(command[1:])
    assert args.command == "api"
    # 0.0.0.0 only inside the container: the CLI's own default stays the loopback.
    assert args.host == "0.0.0.0" and DEFAULT_HOST == "127.0.0.1"
    assert edje_cli().parse_args(["api", "--collection", "c"]).host == "127.0.0.1"
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http-api", args.port) == ("http-api", 8080)
    triton_grpc = next(
        p["containerPort"] for p in server_container()["ports"] if p["name"] == "grpc"
    )
    assert args.protocol == "grpc" and args.url == f"127.0.0.1:{triton_grpc}"
    assert args.api_key is None  # never an argument (it would show in `ps` and the pod spec)
    # The collection is the token bank's volume, as Triton's bank sees it, read-only.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == args.collection]
    assert args.collection == BANK_PATH and mount["readOnly"] is True
    assert mount["name"] == next(
        m["name"] for m in server_container()["volumeMounts"] if m["mountPath"] == BANK_PATH
    )

    # Every probe asks /health on the API's port; the startup probe waits as long as Triton's
    # (its /health is 503 until Triton is ready).
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"] == {"path": "/health", "port": "http-api"}, kind
    startup, triton_startup = container["startupProbe"], server_container()["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= triton_startup["periodSeconds"] * triton_startup["failureThreshold"]

    (env,) = container["env"]
    assert env["name"] == API_KEY_ENV
    assert env["valueFrom"]["secretKeyRef"]["optional"] is True

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert "nvidia.com/gpu" not in resources["requests"] | resources["limits"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec()["terminationGracePeriodSeconds"] >= pause + GRACEFUL_SECONDS
    # The same locked-down container context as Triton's.
    assert container["securityContext"] == server_container()["securityContext"]


def test_pods_run_locked_down():
    spec = pod_spec()
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] >= 10000
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    job = k8s_object("Job")["spec"]["template"]["spec"]
    for container in spec["initContainers"] + spec["containers"] + job["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]
    # Everything that must be writable is a volume: /dev/shm (Python backend) and /tmp.
    mounts = {m["mountPath"]: m for m in server_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The API's own /tmp (uploads spool there), not shared with Triton's scratch space.
    api_mounts = {m["mountPath"]: m["name"] for m in api_container()["volumeMounts"]}
    assert (
        "emptyDir" in volumes[api_mounts["/tmp"]] and api_mounts["/tmp"] != mounts["/tmp"]["name"]
    )
    # 0.0.0.0 (the API image's ENTRYPOINT) is the pod's own network namespace, never the node's.
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for container in spec["containers"]:
        assert all("hostPort" not in p for p in container["ports"]), container["name"]


def test_volumes_for_the_model_repository_and_the_token_bank():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {
        d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == "PersistentVolumeClaim"
    }
    for path, claim in (("/models", "edje-model-repository"), (BANK_PATH, "edje-token-bank")):
        (mount,) = [m for m in server_container()["volumeMounts"] if m["mountPath"] == path]
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["persistentVolumeClaim"]
        assert source == {"claimName": claim, "readOnly": True}
        # Shared by every replica on any node.
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    args = server_container()["args"]
    assert "--model-repository=/models" in args and "--model-control-mode=none" in args
    # The seed job writes the claim the server reads, and the manifest last (the init container
    # waits for it).
    job = k8s_object("Job")["spec"]["template"]["spec"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == "edje-model-repository"
    script = job["containers"][0]["command"][-1]
    assert script.rstrip().splitlines()[-2].startswith("cp /models/edje_manifest.json")
    wait = spec["initContainers"][0]["command"][-1]
    assert "/models/edje_manifest.json" in wait
    # A bank on the volume is a Lance dataset: waited for until it has a committed version.
    assert f"{BANK_PATH}/_versions" in wait and "meta.json" not in wait
    # Object-store credentials for a bank at a URI: from a Secret the pod starts without.
    for source in server_container().get("envFrom", []):
        assert source["secretRef"]["optional"] is True


def test_ray_index_job():
    """The KubeRay RayJob: `edje index --ray` through the Triton Service, pods locked down."""
    rayjob = k8s_object("RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    # The entrypoint is a real `edje index --ray` command line, from a bucket to a bucket,
    # encoding through the Service's gRPC port.
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "edje"
    args = edje_cli().parse_args(words[1:])
    assert args.command == "index" and args.ray and args.workers >= 1
    assert args.repository is None and args.protocol == "grpc"
    service = k8s_object("Service")
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (
        args.url == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{grpc}"
    )
    assert "://" in args.paths[0] and "://" in args.collection
    assert " ".join(words) in DOCS.read_text()  # docs/deploy.md shows the same command
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    # The cluster's Ray is the one the project pins in its `ray` extra (else the installed one).
    pins = [
        str(s.version)
        for s in getattr(project_requirements("ray").get("ray"), "specifier", [])
        if s.operator == "=="
    ]
    assert [spec["rayClusterSpec"]["rayVersion"]] == (pins or [metadata.version("ray")])

    # Every pod locked down like the others; one image everywhere (Ray needs the same Ray and
    # Python on every node).
    images = set()
    policy = k8s_object("NetworkPolicy", "edje-ray-index")
    for role, template in ray_pod_templates().items():
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False, role
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000, role
        assert context["seccompProfile"]["type"] == "RuntimeDefault", role
        labels = template["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), role
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            images.add(container["image"])
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], container["name"]  # Ray's /tmp/ray
            for source in container.get("envFrom", []):
                assert source["secretRef"]["optional"] is True, container["name"]
    assert len(images) == 1
    # The Ray pods reach Triton: its policy admits the inference ports from this namespace.
    triton = k8s_object("NetworkPolicy", "edje-triton")
    assert {"podSelector": {}} in triton["spec"]["ingress"][0]["from"]


def test_service_servicemonitor_and_network_policy_agree():
    container_ports = {p["name"] for c in pod_spec()["containers"] for p in c["ports"]}
    pod_labels = k8s_object("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = k8s_object("Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8000, "http"),
        ("grpc", 8001, "grpc"),
        ("metrics", 8002, "metrics"),
        ("http-api", 8080, "http-api"),
    }
    assert service["spec"]["selector"].items() <= pod_labels.items()

    monitor = k8s_object("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

    policy = k8s_object("NetworkPolicy", "edje-triton")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == container_ports
    # The API is admitted from the same clients as Triton's inference ports, not more widely.
    (inference,) = [
        r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
    ]
    assert {"port": "http-api", "protocol": "TCP"} in inference["ports"]


def test_hpa_pdb_and_adapter_rule_agree():
    deployment = k8s_object("Deployment")
    hpa = k8s_object("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 2
    # A drain never takes the last ready replica.
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]

    (metric,) = hpa["spec"]["metrics"]
    rule = adapter_rule()
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    # Queue time per request, per pod, for the ranker: the model behind edje_rank and
    # edje_rank_by_id.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    query = rule["metricsQuery"]
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>" in query
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>" in query
    assert query.count('model="edje_ranker"') == 2 and "clamp_min" in query
    for ensemble in ("edje_rank", "edje_rank_by_id"):
        config = (ROOT / "model_repository" / ensemble / "config.pbtxt").read_text()
        assert 'model_name: "edje_ranker"' in config, ensemble


def test_adapter_metrics_exist_on_the_real_server(triton_server):
    """The series the adapter rule reads, by name and label, from tritonserver 2.51."""
    import tritonclient.http as httpclient

    def scrape() -> dict:
        url = f"http://{triton_server.host}:{triton_server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return prometheus_samples(response.read().decode())

    def ranker(samples: dict, metric: str) -> float:
        (value,) = [v for (m, labels), v in samples.items() if m == metric and labels >= want]
        return value

    want = {("model", "edje_ranker"), ("version", "1")}
    before = scrape()
    with httpclient.InferenceServerClient(triton_server.http_url) as client:
        text = httpclient.InferInput("text", [2, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"a red circle"], [b"two dogs"]], dtype=object))
        tokens = httpclient.InferInput("compressed_tokens", [2, 64, 384], "FP16")
        tokens.set_data_from_numpy(np.zeros((2, 64, 384), np.float16))
        client.infer("edje_rank", [text, tokens])
    after = scrape()
    requests = ranker(after, "nv_inference_request_success") - ranker(
        before, "nv_inference_request_success"
    )
    queued_us = ranker(after, "nv_inference_queue_duration_us") - ranker(
        before, "nv_inference_queue_duration_us"
    )
    assert requests >= 1 and queued_us >= 0
    # The adapter's value for this interval: milliseconds of queue per ranker request.
    assert 0 <= queued_us / 1000 / requests < 10_000


# --------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_images_are_pinned_non_root_and_healthchecked(flavour):
    stages = dockerfile_stages(DOCKERFILES[flavour])
    for stage in stages.values():
        image = instructions(stage, "FROM")[0].split()[0]
        if image not in ("scratch", *stages):
            tag = image.rpartition(":")[2]
            assert ":" in image and re.search(r"\d", tag) and "latest" not in tag, image
    runtime = stages["runtime"]
    user = instructions(runtime, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), user  # numeric: runAsNonRoot
    assert instructions(runtime, "EXPOSE") == ["8000 8001 8002"]
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    assert "/v2/health/ready" in healthcheck


def test_gpu_image_serves_the_onnxruntime_repository():
    stages = dockerfile_stages(DOCKERFILES["gpu"])
    assert instructions(stages["runtime"], "FROM") == [
        "nvcr.io/nvidia/tritonserver:24.10-py3 AS runtime"
    ]
    assert exec_form(instructions(stages["runtime"], "CMD")[-1]) == [
        "tritonserver",
        "--model-repository=/models",
    ]
    assert "/build/models /models" in instructions(stages["runtime"], "COPY")[-1]
    (build,) = [r for r in instructions(stages["builder"], "RUN") if "edje-build-repo" in r]
    assert "--runtime onnxruntime --gpu --tensorrt --output /build/models" in build
    # Every flag the build stage may pass exists in the builder's command line.
    build_repo_args(
        ["--runtime", "onnxruntime", "--gpu", "--tensorrt", "--output", "/build/models"]
        + ["--checkpoint", "c.pth", "--siglip", "s", "--language-model", "m"]
        + ["--token-bank", BANK_PATH]
    )


def test_cpu_image_runs_edje_serve_on_all_interfaces():
    stages = dockerfile_stages(DOCKERFILES["cpu"])
    command = exec_form(instructions(stages["runtime"], "CMD")[-1])
    assert command[0] == "edje"
    args = edje_cli().parse_args(command[1:])
    assert args.model_repository == "/models"
    assert args.host == "0.0.0.0"  # container networking: see the comment above CMD
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    (build,) = [r for r in instructions(stages["builder"], "RUN") if "edje-build-repo" in r]
    assert "--runtime python --output /build/models" in build
    assert "loadtest" in stages and instructions(stages["loadtest"], "ENTRYPOINT") == ['["locust"]']


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_build_context_holds_what_the_dockerfile_copies(flavour):
    """The per-Dockerfile .dockerignore is an allowlist; every COPY source must be on it."""
    patterns = [
        line
        for line in Path(f"{DOCKERFILES[flavour]}.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = [
        src
        for stage in dockerfile_stages(DOCKERFILES[flavour]).values()
        for args in instructions(stage, "COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert src in allowed and (ROOT / src).exists(), src
    # The constraints the Python 3.11 stages install with resolve the project's requirements.
    constraints = (DOCKER / "constraints.txt").read_text()
    assert re.search(r"^tokenizers==([\d.]+)$", constraints, re.M)


def test_tokenizers_version_is_the_same_in_builder_and_triton_stage():
    """tokenizer.json is written at build time and read in NVIDIA's image: one version."""
    (constraint,) = re.findall(
        r"^tokenizers==([\d.]+)$", (DOCKER / "constraints.txt").read_text(), re.M
    )
    assert f"'tokenizers=={constraint}'" in DOCKERFILES["gpu"].read_text()


def test_api_image_is_pinned_non_root_and_runs_edje_api():
    stages = dockerfile_stages(API_DOCKERFILE)
    (stage,) = stages.values()  # one stage: nothing is built, only installed
    # The same pinned base as the CPU image's Python 3.11 stages.
    (base,) = instructions(stage, "FROM")
    cpu_runtime = instructions(dockerfile_stages(DOCKERFILES["cpu"])["runtime"], "FROM")[0]
    assert base == cpu_runtime.split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    user = instructions(stage, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit(), user  # numeric: runAsNonRoot
    assert instructions(stage, "EXPOSE") == ["8080"]
    assert exec_form(instructions(stage, "ENTRYPOINT")[-1])[:2] == ["edje", "api"]
    args = edje_cli().parse_args(api_image_command()[1:])
    assert args.command == "api" and args.host == "0.0.0.0" and args.port == 8080
    assert args.protocol == "grpc" and args.collection == BANK_PATH and args.api_key is None
    # The healthcheck asks /health on the port the ENTRYPOINT binds, with python (no curl).
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    command = exec_form(healthcheck)
    assert command[:2] == ["python", "-c"] and "urllib.request" in command[2]
    assert f"http://127.0.0.1:{args.port}/health" in command[2]
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_api_image_installs_the_api_extra_and_no_torch():
    (stage,) = dockerfile_stages(API_DOCKERFILE).values()
    (install,) = [r for r in instructions(stage, "RUN") if "pip install" in r]
    assert "--constraint /tmp/src/docker/constraints.txt '/tmp/src[api]'" in install
    # Only the api extra: build (torch), serve (Triton) and all are the other images' business.
    (extras,) = re.findall(r"/tmp/src\[([\w,]+)\]", install)
    assert extras == "api"
    for run in instructions(stage, "RUN"):
        assert "--index-url" not in run and "download.pytorch.org" not in run
        assert not re.search(r"pip install[^&]*\btorch\b", run), run
    # What that install brings, as installed here (the client's dependencies, tritonclient[all]
    # with its extras, and the api extra): none of the exporter's stack.
    names = [*project_requirements(), *project_requirements("api"), *API_PACKAGES]
    closure = _distribution_closure(names, follow_extras=True)
    assert {"tritonclient", "pylance", "pyarrow", "numpy", "fastapi", "uvicorn"} <= closure
    assert closure.isdisjoint(NOT_IN_API_IMAGE), closure & set(NOT_IN_API_IMAGE)


def test_api_packages_are_pinned_at_the_tested_versions():
    constraints = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (DOCKER / "constraints.txt").read_text(), re.M)
    )
    pins = {name.lower().replace("_", "-"): version for name, version in constraints.items()}
    for name in API_PACKAGES:
        # The constraints file holds the versions of the .venv that passes `make test`.
        assert pins.get(name) == metadata.version(name), (name, pins.get(name))
    # Within the client's ranges (numpy<2, pyarrow<23), like the other images.
    for name, requirement in project_requirements().items():
        if name in pins:
            assert requirement.specifier.contains(pins[name]), (name, pins[name])


def test_api_extra_matches_the_pins():
    """pyproject.toml's `api` extra (what `pip install '.[api]'` adds) is the pinned set."""
    api = project_requirements("api")
    if not api:
        pytest.skip("pyproject.toml has no `api` extra yet: Dockerfile.api would install none")
    constraints = (DOCKER / "constraints.txt").read_text()
    assert set(api) == set(API_PACKAGES)
    for name, requirement in api.items():
        (pin,) = re.findall(rf"^{re.escape(name)}==(\S+)$", constraints, re.M | re.I)
        assert requirement.specifier.contains(pin), (name, pin)


def test_api_build_context_holds_what_the_install_needs():
    """Dockerfile.api bind-mounts the context (no COPY); its allowlist must carry what
    ``pip install '.[api]'`` builds from: pyproject's package directories, its readme, and the
    constraints file."""
    patterns = [
        line
        for line in Path(f"{API_DOCKERFILE}.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"].values()
    needed = {"pyproject.toml", pyproject["project"]["readme"], "docker/constraints.txt"}
    needed |= {d.split("/")[0] for d in package_dirs}
    assert needed <= allowed, needed - allowed
    assert all((ROOT / path).exists() for path in allowed)
    (stage,) = dockerfile_stages(API_DOCKERFILE).values()
    assert not instructions(stage, "COPY") and not instructions(stage, "ADD")


# --------------------------------------------------------------------------------------------
# The repository the GPU image bakes (onnxruntime runtime, GPU, TensorRT, with a token bank)


@pytest.fixture(scope="module")
def gpu_bank_repo(tiny_source, tmp_path_factory) -> Path:
    settings = RepoSettings(runtime="onnxruntime", gpu=True, tensorrt=True, token_bank=BANK_PATH)
    return build_repository(tiny_source, tmp_path_factory.mktemp("gpu_bank") / "repo", settings)


def _config(repo: Path, name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(
        (repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )


def test_gpu_repository_is_what_the_container_expects(gpu_bank_repo):
    manifest = json.loads((gpu_bank_repo / "edje_manifest.json").read_text())
    assert manifest["settings"]["runtime"] == "onnxruntime" and manifest["settings"]["gpu"]
    configs = {
        p.name: _config(gpu_bank_repo, p.name) for p in gpu_bank_repo.iterdir() if p.is_dir()
    }
    # Every model an ensemble calls is in the repository.
    for config in configs.values():
        for step in config.ensemble_scheduling.step:
            assert step.model_name in configs, (config.name, step.model_name)
    for name, config in configs.items():
        if config.backend == "python":
            # Python models run on CPU threads next to the GPU models.
            assert all(
                g.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
                for g in config.instance_group
            ), name
    # The bank path baked into edje_token_bank is where the Deployment mounts the bank.
    bank = configs["edje_token_bank"].parameters["bank_path"].string_value
    assert bank == BANK_PATH
    mounts = {m["mountPath"] for m in server_container()["volumeMounts"]}
    assert BANK_PATH in mounts and "edje_rank_by_id" in configs


def test_onnx_models_load_in_the_containers_onnx_runtime(gpu_bank_repo):
    """ORT 1.19 (Triton 24.10) refuses newer IR versions and opsets than it knows."""
    onnx_models = sorted(gpu_bank_repo.glob("*/1/model.onnx"))
    assert len(onnx_models) == 3
    for path in onnx_models:
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version <= MAX_IR_VERSION, path
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        assert opsets.get("ai.onnx", 0) <= MAX_OPSET, (path, opsets)


# The engine cache's volume and the configs that name it (the builder's --trt-cache-path default).
TRT_CACHE = "/trt-cache"


def test_trt_cache_volume_is_where_the_gpu_configs_keep_engines(gpu_bank_repo):
    """Every TensorRT cache directory of the GPU image's repository lies right under the
    Deployment's read-write mount of the shared engine-cache claim (ONNX Runtime creates only
    the last level of a cache directory)."""
    (mount,) = [m for m in server_container()["volumeMounts"] if m["mountPath"] == TRT_CACHE]
    assert not mount.get("readOnly", False)
    volume = {v["name"]: v for v in pod_spec()["volumes"]}[mount["name"]]
    claim = k8s_object("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica, any node
    assert not volume["persistentVolumeClaim"].get("readOnly", False)
    paths = []
    for name in ("edje_ranker", "edje_vision_adapter", "edje_text_encoder"):
        (accelerator,) = _config(
            gpu_bank_repo, name
        ).optimization.execution_accelerators.gpu_execution_accelerator
        parameters = dict(accelerator.parameters)
        assert parameters["trt_engine_cache_enable"] == parameters["trt_timing_cache_enable"] == "1"
        paths += [parameters["trt_engine_cache_path"], parameters["trt_timing_cache_path"]]
    assert {str(Path(path).parent) for path in paths} == {TRT_CACHE}, paths
    # Only the cache is written: the repository and the bank stay read-only.
    writable = [m["mountPath"] for m in server_container()["volumeMounts"] if not m.get("readOnly")]
    assert set(writable) == {TRT_CACHE, "/dev/shm", "/tmp"}


def test_startup_probe_budget_is_the_documented_one():
    """docs/deploy.md states the startup probe's budget (Probes, and the starts of section 11):
    sized for a warm start, well under the 20 minutes every pod's engine build used to need."""
    startup = server_container()["startupProbe"]
    period, failures = startup["periodSeconds"], startup["failureThreshold"]
    budget = period * failures
    stated = f"every {period} s, {failures} failures allowed: {budget // 60} min"
    assert budget % 60 == 0 and budget < 20 * 60
    text = DOCS.read_text()
    (probes_row,) = [
        line for line in text.splitlines() if line.startswith("| `startupProbe` | `GET /v2/health")
    ]
    assert stated in probes_row
    section = text.split("## 11. TensorRT engine cache", 1)[1].split("\n## ", 1)[0]
    (warm_row,) = [line for line in section.splitlines() if line.startswith("| **Warm**")]
    assert stated in warm_row
    # The cold-start procedure's threshold outlasts the old 20-minute build budget.
    assert "`failureThreshold`" in section and "to 120 (20 min)" in section
    # The HTTP API's startup probe (it waits on Triton's readiness) allows at least as long.
    api = api_container()["startupProbe"]
    assert api["periodSeconds"] * api["failureThreshold"] >= budget


def test_gpu_image_provides_the_engine_cache_directory():
    """Without the directory, ONNX Runtime cannot create the per-model cache directories under it
    and the ONNX models fail to load; Kubernetes mounts the volume there, `docker run` may not."""
    runs = " ".join(instructions(dockerfile_stages(DOCKERFILES["gpu"])["runtime"], "RUN"))
    assert re.search(rf"mkdir[^;&]*{TRT_CACHE}\b", runs) and re.search(
        rf"chown[^;&]*1000[^;&]*{TRT_CACHE}\b", runs
    )


# What the Triton stage of Dockerfile.gpu installs; its Python models may import nothing else.
IMPORT_GATE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys, sysconfig, types
    allowed = set(json.loads(sys.argv[1]))
    stdlib = set(sys.stdlib_module_names) - {"tomllib"}  # tomllib is new in 3.11; Triton's is 3.10
    stdlib.add(sysconfig._get_sysconfigdata_name())  # the interpreter's own build variables

    class Gate(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top not in stdlib and top not in allowed:
                raise ModuleNotFoundError(f"No module named {top!r} in the Triton image")

    sys.meta_path.insert(0, Gate())
    from tests.triton_stub import _as_module
    sys.modules["triton_python_backend_utils"] = _as_module()
    for model_py in sys.argv[2:]:
        sys.path.insert(0, model_py.rsplit("/", 1)[0])
        sys.modules.pop("edje_backend_utils", None)
        spec = importlib.util.spec_from_file_location("m" + str(len(sys.path)), model_py)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        sys.path.pop(0)
    import lance  # edje_bank imports it when the bank opens, not at import time
    """
)


def _distribution_closure(names: list[str], follow_extras: bool = False) -> set[str]:
    """``names`` and everything they require, as installed here. ``follow_extras``: also what
    the extras of each requirement bring (``tritonclient[all]``); not installed here: skipped."""
    seen: set[str] = set()
    todo = [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            if not follow_extras:
                raise
            continue
        for requirement in requires:
            req = Requirement(requirement)
            wanted = [""] + sorted(extras)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((req.name, frozenset(req.extras) if follow_extras else frozenset()))
    return {key for key, _ in seen}


def test_python_models_import_only_what_the_gpu_image_installs(gpu_bank_repo):
    stage = dockerfile_stages(DOCKERFILES["gpu"])["runtime"]
    (install,) = [r for r in instructions(stage, "RUN") if "pip install" in r]
    pins = dict(re.findall(r"'([A-Za-z0-9_.-]+)==([^']+)'", install))
    pinned = list(pins)
    # pylance and pyarrow for edje_token_bank; never the project (nor its client package).
    assert {"numpy", "pillow", "tokenizers", "pylance", "pyarrow"} <= set(pinned)
    assert "edje_triton" not in install and "/wheels" not in install
    # Within the project's own ranges (numpy<2, pyarrow<23, pylance>=14.0.2,<14.1).
    requirements = project_requirements()
    for name in ("numpy", "pyarrow", "pylance"):
        assert requirements[name].specifier.contains(pins[name]), (name, pins[name])
    dists = _distribution_closure(pinned)
    modules = {
        module
        for module, owners in metadata.packages_distributions().items()
        if any(owner.lower().replace("_", "-") in dists for owner in owners)
    }
    # The shared helpers the builder copies beside each model.py (edje_bank, ...).
    helpers = {p.stem for p in (ROOT / "model_repository" / "_shared").glob("*.py")}
    allowed = sorted(modules | helpers | {"tests"})
    model_files = sorted(str(p) for p in gpu_bank_repo.glob("*/1/model.py"))
    assert len(model_files) == 4  # preprocess, tokenizer, text tokenizer, token bank
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_GATE, json.dumps(allowed), *model_files],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_python_model_code_parses_as_python_310(gpu_bank_repo):
    """NVIDIA's image runs the Python backend on its own Python 3.10."""
    files = [*gpu_bank_repo.glob("*/1/*.py"), *(ROOT / "client" / "edje_client").glob("*.py")]
    for path in files:
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_healthcheck_command_against_the_real_server(flavour, triton_server):
    """The HEALTHCHECK's own command: passes on a ready server, fails where none listens."""
    from edje_client.server import find_free_port

    (healthcheck,) = instructions(dockerfile_stages(DOCKERFILES[flavour])["runtime"], "HEALTHCHECK")
    command = exec_form(healthcheck)
    assert command[0] in ("python", "python3") and command[1] == "-c"
    code = command[2]
    assert "127.0.0.1:8000" in code
    ready = code.replace("127.0.0.1:8000", triton_server.http_url)
    assert subprocess.run([sys.executable, "-c", ready], capture_output=True).returncode == 0
    closed = code.replace("127.0.0.1:8000", f"127.0.0.1:{find_free_port()}")
    assert subprocess.run([sys.executable, "-c", closed], capture_output=True).returncode != 0


def test_api_healthcheck_command_against_the_real_api(triton_server, tmp_path):
    """The API image's HEALTHCHECK command: passes on an API in front of a ready Triton, fails
    on one whose Triton is unreachable (503) and where nothing listens."""
    pytest.importorskip("fastapi")
    from edje_client.api.server import ApiServer
    from edje_client.api.settings import ApiSettings
    from edje_client.server import find_free_port

    (stage,) = dockerfile_stages(API_DOCKERFILE).values()
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    code = exec_form(healthcheck)[2]
    assert "127.0.0.1:8080" in code

    def check(address: str) -> int:
        probe = code.replace("127.0.0.1:8080", address)
        return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode

    collection = str(tmp_path / "collection")  # a missing collection opens empty
    for url, healthy in ((triton_server.grpc_url, True), (f"127.0.0.1:{find_free_port()}", False)):
        settings = ApiSettings(collection=collection, url=url, protocol="grpc", port=0)
        with ApiServer(settings) as api:
            assert (check(f"127.0.0.1:{api.port}") == 0) is healthy, url
    assert check(f"127.0.0.1:{find_free_port()}") != 0


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_publishes_on_loopback_and_gates_the_load_test():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    triton, locust = compose["services"]["triton"], compose["services"]["locust"]
    published = [
        re.fullmatch(r"\$\{EDJE_PUBLISH_ADDRESS:-127\.0\.0\.1\}:\$\{\w+:-(\d+)\}:(\d+)", port)
        for port in triton["ports"]
    ]
    assert all(published), triton["ports"]  # the host's loopback unless told otherwise
    assert {(m[1], m[2]) for m in published} == {
        ("8000", "8000"),
        ("8001", "8001"),
        ("8002", "8002"),
    }
    assert "profiles" not in triton and locust["profiles"] == ["loadtest"]
    assert locust["depends_on"] == {"triton": {"condition": "service_healthy"}}
    stages = dockerfile_stages(DOCKERFILES["cpu"])
    for service, target in ((triton, "runtime"), (locust, "loadtest")):
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["build"]["target"] == target and target in stages
    assert triton["read_only"] and triton["cap_drop"] == ["ALL"] and triton["shm_size"]

    # locust -f /loadtest/locustfile.py --headless ... with the locustfile mounted from the repo.
    (mount,) = locust["volumes"]
    source, target, mode = mount.split(":")
    assert (target, mode) == ("/loadtest", "ro")
    locustfile = (DOCKER / source / "locustfile.py").resolve()
    assert locustfile == ROOT / "loadtest" / "locustfile.py" and locustfile.is_file()
    command = locust["command"]
    assert command[:3] == ["-f", "/loadtest/locustfile.py", "--headless"]
    user_classes = {
        n.name for n in ast.parse(locustfile.read_text()).body if isinstance(n, ast.ClassDef)
    }
    assert command[-1] in user_classes


def test_compose_api_service():
    """The API beside Triton: health-gated on it, Triton by service name over gRPC, the
    collection volume read-write, its port on the host's 127.0.0.1 only, the key optional."""
    from edje_client.api.settings import API_KEY_ENV

    services = compose()["services"]
    api, triton = services["api"], services["triton"]
    build = api["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == API_DOCKERFILE
    assert "target" not in api["build"] and "profiles" not in api
    assert api["depends_on"] == {"triton": {"condition": "service_healthy"}}
    args = edje_cli().parse_args(api_image_command(api["command"])[1:])
    assert args.command == "api" and args.host == "0.0.0.0" and args.api_key is None
    # `triton` is the service's name on the compose network; 8001 the gRPC port `edje serve`
    # listens on in the CPU image (a container port, not the published one).
    serve = edje_cli().parse_args(
        exec_form(instructions(dockerfile_stages(DOCKERFILES["cpu"])["runtime"], "CMD")[-1])[1:]
    )
    assert args.protocol == "grpc" and args.url == f"triton:{serve.grpc_port}"

    # Published on the host's loopback only, whatever EDJE_PUBLISH_ADDRESS says for Triton.
    (published,) = api["ports"]
    match = re.fullmatch(r"127\.0\.0\.1:\$\{API_PORT:-(\d+)\}:(\d+)", published)
    assert match and match[1] == match[2] == str(args.port) == "8080", published

    # The collection: a named volume, read-write here (POST /v1/index), read-only in Triton at
    # the same path (its token bank, when built with BANK_PATH).
    (mount,) = api["volumes"]
    volume, target = mount.split(":")
    assert target == args.collection == BANK_PATH and volume in compose()["volumes"]
    assert f"{volume}:{BANK_PATH}:ro" in triton["volumes"]
    assert triton["build"]["args"]["BANK_PATH"] == "${BANK_PATH:-}"

    # The key from the environment, empty (no key) when unset; never written in the file.
    assert api["environment"] == {API_KEY_ENV: f"${{{API_KEY_ENV}:-}}"}
    # Health: the image's own command on /health.
    test = api["healthcheck"]["test"]
    (stage,) = dockerfile_stages(API_DOCKERFILE).values()
    assert test == ["CMD", *exec_form(instructions(stage, "HEALTHCHECK")[0])]
    assert api["read_only"] and api["cap_drop"] == ["ALL"] and "/tmp" in api["tmpfs"]
    assert "no-new-privileges:true" in api["security_opt"]

    # One image name and tag for the API everywhere: compose, the pod, the kustomization, and
    # the project's version.
    version = pytest.importorskip("tomllib").loads((ROOT / "pyproject.toml").read_text())
    assert api["image"] == api_container()["image"] == f"edje-api:{version['project']['version']}"
    (entry,) = [i for i in k8s_object("Kustomization")["images"] if i["name"] == "edje-api"]
    assert entry["newTag"] == api["image"].partition(":")[2]


# --------------------------------------------------------------------------------------------
# docs/deploy.md


def test_docs_name_real_files_and_say_what_was_not_run():
    text = DOCS.read_text()
    assert "## What has not been run here" in text
    for path in set(re.findall(r"(?<![\w/.-])((?:docker|deploy|loadtest)/[\w./-]*\w)", text)):
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"
    for needle in (
        "/v2/health/ready",
        "/v2/health/live",
        adapter_rule()["name"]["as"],
        "nv_inference_queue_duration_us",
        "nvidia.com/gpu",
        # The API container's section.
        "docker/Dockerfile.api",
        "EDJE_API_KEY",
        "GET /health",
        "http-api",
    ):
        assert needle in text, needle
    # Every `docker build -f` in the docs names a Dockerfile that exists.
    for command in re.findall(r"docker build [^`\n]*", text):
        words = shlex.split(command.rstrip("\\"))
        if "-f" in words:
            assert (ROOT / words[words.index("-f") + 1]).is_file(), command
