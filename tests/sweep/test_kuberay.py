"""rayjob.yaml passes KubeRay's RayJob schema and Kubernetes' own, runs the paper sweep as a
cluster runs it on one shared volume, and exposes nothing outside the Kubernetes cluster."""

import copy
import functools
import importlib.metadata
import importlib.resources
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from sweep.cli import build_parser
from sweep.config import load_preset
from tests.sweep.cluster_sandbox import PAPER_SWEEP_ON_CLUSTER

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "rayjob.yaml"
SCHEMA = ROOT / "tests" / "schemas" / "kuberay" / "rayjob-v1.openapi.yaml"
KUBERNETES = "1.32"  # the Kubernetes whose schemas the manifest is checked against
EXPOSED = ("LoadBalancer", "NodePort")  # Service types that open the cluster to the outside
IMAGE = re.compile(r"rayproject/ray:(?P<version>(?P<minor>\d+\.\d+)\.\d+)-py311(?P<gpu>-gpu)?")


def _objects(text: str) -> dict[str, dict]:
    """The manifest's objects by kind: the shared volume and the RayJob."""
    objects = [o for o in yaml.safe_load_all(text) if o]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["PersistentVolumeClaim", "RayJob"], f"rayjob.yaml holds {kinds}"
    return {o["kind"]: o for o in objects}


def _manifest() -> dict[str, dict]:
    return _objects(MANIFEST.read_text())


# --- Schemas ---------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """Close every object schema that lists its properties, as kubeconform's --strict does with a
    CRD's schema: the API server rejects unknown fields (kubectl's default field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    open_ = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_:
        out["additionalProperties"] = False
    return out


def _kubernetes_definitions() -> dict:
    """Kubernetes' schemas of its built-in types (strict), as kubernetes-validate ships them."""
    folder = importlib.resources.files(kubernetes_validate) / "kubernetes-json-schema"
    path = folder / f"v{KUBERNETES}.0-local-strict" / "_definitions.json"
    assert path.is_file(), f"kubernetes-validate ships no Kubernetes {KUBERNETES} schemas"
    return json.loads(path.read_text())


@functools.cache
def _rayjob_validator() -> jsonschema.Draft202012Validator:
    registry = Resource.from_contents(_kubernetes_definitions()) @ Registry()
    schema = strict(yaml.safe_load(SCHEMA.read_text()))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def rayjob_schema_errors(rayjob: dict) -> list[str]:
    """Where the RayJob breaks KubeRay's schema, one line per error."""
    errors = _rayjob_validator().iter_errors(rayjob)
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def kubernetes_schema_errors(obj: dict) -> list[str]:
    """Where a built-in object breaks Kubernetes' schema (the first error only)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"/{'/'.join(map(str, err.absolute_path))}: {err.message}"]
    return []


def pod_templates(rayjob: dict) -> dict[str, dict]:
    """The pod template of the head and of each worker group, by a name for messages."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"]}
    for group in cluster.get("workerGroupSpecs", []):
        groups[f"worker group {group['groupName']}"] = group
    return {name: group["template"] for name, group in groups.items()}


def as_pod_template(name: str, template: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


def test_rayjob_passes_kuberays_schema() -> None:
    errors = rayjob_schema_errors(_manifest()["RayJob"])
    assert not errors, "\n".join(errors)


def test_volume_and_pod_templates_pass_kubernetes_schemas() -> None:
    manifest = _manifest()
    errors = kubernetes_schema_errors(manifest["PersistentVolumeClaim"])
    for name, template in pod_templates(manifest["RayJob"]).items():
        wrapped = as_pod_template(name.replace(" ", "-"), template)
        errors += [f"{name}: {e}" for e in kubernetes_schema_errors(wrapped)]
    assert not errors, "\n".join(errors)


def test_schemas_reject_what_kubernetes_would() -> None:
    rayjob = _manifest()["RayJob"]
    wrong_type = copy.deepcopy(rayjob)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    assert any(
        e.endswith("minReplicas: 'zero' is not of type 'integer'")
        for e in rayjob_schema_errors(wrong_type)
    ), rayjob_schema_errors(wrong_type)
    misspelt = copy.deepcopy(rayjob)
    misspelt["spec"]["shutdownAfterJobFinish"] = misspelt["spec"].pop("shutdownAfterJobFinishes")
    assert any(
        "'shutdownAfterJobFinish' was unexpected" in e for e in rayjob_schema_errors(misspelt)
    )
    # A misspelt field in a pod template: KubeRay's schema reaches into it, and so does Kubernetes'.
    head = misspelt["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["volumeMount"] = head.pop("volumeMounts")
    assert any("'volumeMount' was unexpected" in e for e in rayjob_schema_errors(misspelt))
    assert kubernetes_schema_errors(as_pod_template("head", pod_templates(misspelt)["head"]))
    pvc = _manifest()["PersistentVolumeClaim"]
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string where a list belongs
    assert kubernetes_schema_errors(pvc)


# --- What the schemas cannot say ---------------------------------------------------------------


def _cluster_problems(rayjob: dict) -> list[str]:
    """A head that runs no trials; GPU workers that start from none; CPU and memory asked for."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    problems = []
    if rayjob["apiVersion"] != "ray.io/v1":
        problems.append(f"apiVersion is {rayjob['apiVersion']}, not ray.io/v1")
    head_cpus = cluster["headGroupSpec"]["rayStartParams"].get("num-cpus")
    if head_cpus != "0":
        problems.append(f'head rayStartParams num-cpus is {head_cpus!r}, not "0": it runs trials')
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true: no GPU worker would ever start")
    workers = cluster.get("workerGroupSpecs", [])
    if not workers:
        problems.append("no worker group")
    for group in workers:
        name = f"worker group {group['groupName']}"
        if group.get("minReplicas") != 0:
            problems.append(f"{name}: minReplicas is {group.get('minReplicas')}, not 0")
        if not group.get("maxReplicas", 0) >= 1:
            problems.append(f"{name}: maxReplicas is {group.get('maxReplicas')}, below 1")
        containers = group["template"]["spec"]["containers"]
        limits = [c.get("resources", {}).get("limits", {}) for c in containers]
        if not any(int(limit.get("nvidia.com/gpu", 0)) >= 1 for limit in limits):
            problems.append(f"{name}: no container has nvidia.com/gpu in its limits")
    for name, template in pod_templates(rayjob).items():
        for container in template["spec"]["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - resources.get(kind, {}).keys()
                if missing:
                    problems.append(f"{name}, {container['name']}: no {sorted(missing)} in {kind}")
    return problems


def _lifecycle_problems(rayjob: dict) -> list[str]:
    """The Ray cluster goes when the sweep ends; a failed sweep runs again (and so resumes)."""
    spec = rayjob["spec"]
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true: the Ray cluster outlives the sweep")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append("no ttlSecondsAfterFinished")
    retries = spec.get("backoffLimit", 0)
    if not retries >= 1:
        problems.append(f"backoffLimit is {retries}: a failed sweep is not resumed")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(f"submissionMode is {spec['submissionMode']}, not K8sJobMode")
    return problems


def _image_problems(rayjob: dict) -> list[str]:
    """Each Ray image is Ray's own for Python 3.11 (-gpu on workers), of the Ray the project runs."""
    installed = ".".join(importlib.metadata.version("ray").split(".")[:2])
    cluster = rayjob["spec"]["rayClusterSpec"]
    problems = []
    for name, template in pod_templates(rayjob).items():
        image = template["spec"]["containers"][0]["image"]
        found = IMAGE.fullmatch(image)
        if not found:
            problems.append(f"{name}: image {image} is not rayproject/ray:<version>-py311[-gpu]")
            continue
        if found["minor"] != installed:
            problems.append(
                f"{name}: image {image} has Ray {found['minor']}, the project {installed}"
            )
        gpu = name != "head"
        if bool(found["gpu"]) != gpu:
            problems.append(f"{name}: image {image} should {'' if gpu else 'not '}be -gpu")
        if cluster.get("rayVersion") != found["version"]:
            problems.append(f"rayVersion {cluster.get('rayVersion')} is not {image}'s")
    return problems


def _volume_problems(rayjob: dict, pvc: dict) -> tuple[PurePosixPath, list[str]]:
    """The path where every pod mounts the shared volume, and what is wrong with the volume."""
    claim = pvc["metadata"]["name"]
    problems = []
    if "ReadWriteMany" not in pvc["spec"]["accessModes"]:
        problems.append(f"{claim}: accessModes {pvc['spec']['accessModes']} lack ReadWriteMany")
    mounts = {}
    for name, template in pod_templates(rayjob).items():
        spec = template["spec"]
        volumes = {
            v["name"]
            for v in spec.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        }
        paths = {
            m["mountPath"]
            for c in spec["containers"]
            for m in c.get("volumeMounts", [])
            if m["name"] in volumes
        }
        if len(paths) != 1:
            problems.append(f"{name} mounts {claim} at {sorted(paths) or 'no path'}")
        mounts[name] = paths
    if len({frozenset(p) for p in mounts.values()}) != 1:
        problems.append(f"{claim} is mounted at different paths: {mounts}")
    return PurePosixPath(next(iter(mounts["head"]), "/nowhere")), problems


def _command_problems(rayjob: dict, mount: PurePosixPath) -> list[str]:
    """The entrypoint is the cluster's paper sweep, a valid `corroprune sweep` whose data and
    RUN_DIR lie on the shared volume; the job installs this corroprune from there."""
    entrypoint = rayjob["spec"]["entrypoint"]
    problems = []
    if entrypoint != PAPER_SWEEP_ON_CLUSTER:
        problems.append(f"entrypoint {entrypoint!r} is not the cluster's paper sweep")
    argv = shlex.split(entrypoint)
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [*problems, f"entrypoint {entrypoint!r} is not a valid corroprune command"]
    if argv[0] != "corroprune" or args.command != "sweep" or args.address != "auto":
        problems.append(f"entrypoint {entrypoint!r} is not `corroprune sweep --address auto`")
    roots = dict(root.split("=", 1) for root in args.data_root)
    datasets = set(load_preset(args.preset)["sweep"]["datasets"])
    if roots.keys() != datasets:
        problems.append(
            f"entrypoint names data roots {sorted(roots)}, the preset reads {sorted(datasets)}"
        )
    for what, path in [("RUN_DIR", str(args.out)), *roots.items()]:
        if not PurePosixPath(path).is_relative_to(mount):
            problems.append(f"entrypoint: {what} {path} is not on the shared volume {mount}")
    runtime_env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML", "")) or {}
    cache = runtime_env.get("env_vars", {}).get("CORROPRUNE_CACHE", "")
    if not PurePosixPath(cache).is_relative_to(mount):
        problems.append(f"runtimeEnvYAML: CORROPRUNE_CACHE {cache!r} is not on {mount}")
    wheel = f"corroprune-{importlib.metadata.version('corroprune')}-py3-none-any.whl"
    if mount / "wheels" / wheel not in map(PurePosixPath, runtime_env.get("pip", [])):
        problems.append(f"runtimeEnvYAML: pip does not install {mount}/wheels/{wheel}")
    return problems


def _exposure_problems(text: str, rayjob: dict) -> list[str]:
    """No Service type, Ingress, host network or host port that reaches outside the cluster."""
    problems = [f"rayjob.yaml says {word}" for word in EXPOSED if word in text]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head serviceType is {head['serviceType']}, not ClusterIP")
    if head.get("enableIngress"):
        problems.append("the head has an Ingress")
    for name, template in pod_templates(rayjob).items():
        if template["spec"].get("hostNetwork"):
            problems.append(f"{name} uses the host network")
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        if any("hostPort" in p for p in ports):
            problems.append(f"{name} binds a host port")
    return problems


def problems(text: str) -> list[str]:
    """What is wrong with a manifest beyond its schemas, one line each."""
    objects = _objects(text)
    rayjob, pvc = objects["RayJob"], objects["PersistentVolumeClaim"]
    mount, volume = _volume_problems(rayjob, pvc)
    return [
        *_cluster_problems(rayjob),
        *_lifecycle_problems(rayjob),
        *_image_problems(rayjob),
        *volume,
        *_command_problems(rayjob, mount),
        *_exposure_problems(text, rayjob),
    ]


def test_rayjob_runs_the_paper_sweep_on_the_shared_volume() -> None:
    found = problems(MANIFEST.read_text())
    assert not found, "\n".join(found)


HEAD = "spec.rayClusterSpec.headGroupSpec"
WORKERS = "spec.rayClusterSpec.workerGroupSpecs.0"
WORKER = f"{WORKERS}.template.spec.containers.0"
BROKEN = {
    "head runs trials": ("RayJob", f"{HEAD}.rayStartParams.num-cpus", "4", "num-cpus is '4'"),
    "no autoscaler": (
        "RayJob",
        "spec.rayClusterSpec.enableInTreeAutoscaling",
        False,
        "enableInTree",
    ),
    "idle GPU pod": ("RayJob", f"{WORKERS}.minReplicas", 1, "minReplicas is 1"),
    "no GPU": (
        "RayJob",
        f"{WORKER}.resources.limits",
        {"cpu": "7", "memory": "26Gi"},
        "nvidia.com/gpu",
    ),
    "no CPU request": (
        "RayJob",
        f"{WORKER}.resources.requests",
        {"memory": "26Gi"},
        "['cpu'] in requests",
    ),
    "cluster kept": ("RayJob", "spec.shutdownAfterJobFinishes", False, "shutdownAfterJobFinishes"),
    "no retry": ("RayJob", "spec.backoffLimit", 0, "backoffLimit is 0"),
    "old Ray": ("RayJob", f"{WORKER}.image", "rayproject/ray:2.40.0-py311-gpu", "Ray 2.40"),
    "CPU image": ("RayJob", f"{WORKER}.image", "rayproject/ray:2.60.0-py311", "should be -gpu"),
    "one writer": ("PersistentVolumeClaim", "spec.accessModes", ["ReadWriteOnce"], "ReadWriteMany"),
    "other mount": ("RayJob", f"{WORKER}.volumeMounts.0.mountPath", "/data", "different paths"),
    "local RUN_DIR": (
        "RayJob",
        "spec.entrypoint",
        PAPER_SWEEP_ON_CLUSTER.replace("--out /mnt/shared/runs", "--out /tmp/runs"),
        "RUN_DIR /tmp/runs/paper is not on the shared volume",
    ),
    "bad flag": (
        "RayJob",
        "spec.entrypoint",
        "corroprune sweep --preset paper --outt x",
        "not a valid",
    ),
    "cache per pod": (
        "RayJob",
        "spec.runtimeEnvYAML",
        "pip: [/mnt/shared/wheels/corroprune-0.1.0-py3-none-any.whl]\n",
        "CORROPRUNE_CACHE '' is not on /mnt/shared",
    ),
    "public head": ("RayJob", f"{HEAD}.serviceType", "NodePort", "says NodePort"),
    "host network": (
        "RayJob",
        f"{HEAD}.template.spec.hostNetwork",
        True,
        "head uses the host network",
    ),
}


def _broken(kind: str, path: str, value: Any) -> str:
    """rayjob.yaml with one value set, as text."""
    objects = _manifest()
    *parents, last = path.split(".")
    node = objects[kind]
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return yaml.safe_dump_all(objects.values(), sort_keys=False)


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_each_broken_manifest_is_named(case: str) -> None:
    kind, path, value, message = BROKEN[case]
    found = problems(_broken(kind, path, value))
    assert any(message in line for line in found), found
