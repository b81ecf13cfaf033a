"""Static checks of everything that deploys tnlbt: cluster launcher YAMLs, KubeRay manifests, runtime_env,
Dockerfile, Qdrant compose. Nothing here talks to a cloud or a Kubernetes API.

* ``ray_cluster.yaml`` / ``cluster/ray_cluster.local.yaml`` go through Ray's own ``prepare_config`` +
  ``validate_config`` (what ``ray up`` runs before touching any machine), and broken variants must fail it.
* KubeRay manifests are checked against the field names of the KubeRay v1 Go types
  (``ray-operator/apis/ray/v1``), so a typo in a key fails here instead of being dropped silently by the
  API server; the RayService's ``serveConfigV2`` must parse with ``ray.serve.schema.ServeDeploySchema``
  and equal ``serve/config.yaml``.
* Every ``tnlbt ...`` command in a RayJob must parse with the real CLI parser, and its ``section.key=value``
  overrides must validate with the real config loader.
* Image tags, ``rayVersion`` and the Dockerfile's base image must carry the Ray version pinned in
  ``requirements/pins.txt``.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from json import dumps as json_dumps
from json import loads as json_loads
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements" / "pins.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[re.sub(r"\[.*\]", "", name).strip().lower()] = ver.strip()
    return out


PINS = _pins()
RAY_VERSION = PINS["ray"]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# -- cluster launcher ---------------------------------------------------------------------------------
def _ray_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def aws_cfg() -> dict[str, Any]:
    return _load(ROOT / "ray_cluster.yaml")


@pytest.fixture(scope="module")
def local_cfg() -> dict[str, Any]:
    return _load(CLUSTER / "ray_cluster.local.yaml")


def test_aws_cluster_passes_ray_validation(aws_cfg):
    cfg = _ray_validate(aws_cfg)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no work on the head"
    assert head["max_workers"] == 0
    # At least one CPU pool, one multi-GPU training pool and one serving pool, all autoscaled.
    insts = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    multi_gpu = {"g5.12xlarge", "g5.24xlarge", "g5.48xlarge", "p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge"}
    assert any(i in multi_gpu for i in insts.values()), insts
    assert any(i.startswith("g5.xlarge") or i.startswith("g6.xlarge") for i in insts.values()), insts
    assert any(i.startswith(("m6i", "m7i", "c6i", "c7i", "r6i")) for i in insts.values()), insts
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0


def test_aws_cluster_image_and_setup_match_pins(aws_cfg):
    image = aws_cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{RAY_VERSION}-py311"), image
    mount = next(iter(aws_cfg["file_mounts"]))
    setup = " ".join(aws_cfg["setup_commands"])
    # The project is installed from the mounted repo with the exact pins, in one pip command.
    assert f"-r {mount}/requirements/pins.txt -e {mount}" in setup
    assert RAY_VERSION in setup  # the version check after install
    assert "--num-cpus=0" in " ".join(aws_cfg["head_start_ray_commands"])
    run_opts = " ".join(aws_cfg["docker"]["run_options"])
    for var in ("TNLBT_PROCESSED=s3://", "TNLBT_RUNS=s3://", "TNLBT_RAW=s3://"):
        assert var in run_opts, var


def test_local_cluster_passes_ray_validation(local_cfg):
    cfg = _ray_validate(local_cfg)
    (node_type,) = cfg["available_node_types"].values()
    n = len(local_cfg["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n
    assert local_cfg["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=1), "min_worker"),
        (lambda c: c.update(max_workers="many"), "many"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu_serve"].update(min_workers=99), "min_workers"),
        (lambda c: c["docker"].update(imag="x"), "imag"),
    ],
)
def test_ray_validation_rejects_broken_aws_config(aws_cfg, mutate, match):
    bad = copy.deepcopy(aws_cfg)
    mutate(bad)
    with pytest.raises(Exception, match=match):
        _ray_validate(bad)


def test_ray_validation_rejects_broken_local_config(local_cfg):
    bad = copy.deepcopy(local_cfg)
    bad["idle_timeout_minute"] = 5
    with pytest.raises(Exception, match="idle_timeout_minute"):
        _ray_validate(bad)


# -- KubeRay structural schema (field names from ray-operator/apis/ray/v1/*_types.go, KubeRay 1.3-1.5) --
_CLUSTER_SPEC = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "gcsFaultToleranceOptions",
    "managedBy",
    "upgradeStrategy",
    "authOptions",
}
_HEAD = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
_WORKER = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "idleTimeoutSeconds",
    "suspend",
    "resources",
    "labels",
}
_AUTOSCALER = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
_JOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
_SERVICE_SPEC = {
    "serveConfigV2",
    "rayClusterConfig",
    "serveService",
    "upgradeStrategy",
    "excludeHeadPodFromServeSvc",
    "rayClusterDeletionDelaySeconds",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}


def _unknown(d: dict[str, Any], allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{k}" for k in d if k not in allowed]


def _check_pod_template(tpl: dict[str, Any], where: str, errors: list[str]) -> None:
    containers = (tpl.get("spec") or {}).get("containers") or []
    if not containers:
        errors.append(f"{where}.template.spec.containers: empty")
    volumes = {v.get("name") for v in (tpl.get("spec") or {}).get("volumes") or []}
    for i, c in enumerate(containers):
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                errors.append(f"{where}.containers[{i}].volumeMounts {m.get('name')!r}: no such volume")
        for key in ("name", "image"):
            if not c.get(key):
                errors.append(f"{where}.containers[{i}].{key}: missing")
        limits = (c.get("resources") or {}).get("limits") or {}
        if not limits.get("memory"):
            errors.append(f"{where}.containers[{i}].resources.limits.memory: missing (Ray sizes from it)")
        img = c.get("image", "")
        if f"ray{RAY_VERSION}" not in img and f"ray:{RAY_VERSION}" not in img:
            errors.append(f"{where}.containers[{i}].image {img!r}: tag does not carry Ray {RAY_VERSION}")


def check_cluster_spec(spec: dict[str, Any], where: str) -> list[str]:
    """Problems in a RayClusterSpec (RayCluster, RayJob rayClusterSpec, RayService rayClusterConfig)."""
    errors = _unknown(spec, _CLUSTER_SPEC, where)
    if spec.get("rayVersion") != RAY_VERSION:
        errors.append(f"{where}.rayVersion {spec.get('rayVersion')!r} != pinned {RAY_VERSION}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [*errors, f"{where}.headGroupSpec: missing"]
    errors += _unknown(head, _HEAD, f"{where}.headGroupSpec")
    for key in ("rayStartParams", "template"):
        if key not in head:
            errors.append(f"{where}.headGroupSpec.{key}: missing")
    params = head.get("rayStartParams") or {}
    if params.get("num-cpus") != "0":
        errors.append(f'{where}.headGroupSpec.rayStartParams.num-cpus must be "0" (no work on the head)')
    if any(not isinstance(v, str) for v in params.values()):
        errors.append(f"{where}.headGroupSpec.rayStartParams: values must be strings")
    _check_pod_template(head.get("template") or {}, f"{where}.headGroupSpec", errors)
    errors += _unknown(spec.get("autoscalerOptions") or {}, _AUTOSCALER, f"{where}.autoscalerOptions")
    names = set()
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        errors += _unknown(g, _WORKER, w)
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in g:
                errors.append(f"{w}.{key}: missing")
        if g.get("groupName") in names:
            errors.append(f"{w}.groupName {g.get('groupName')!r}: duplicate")
        names.add(g.get("groupName"))
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not 0 <= lo <= g.get("replicas", lo) <= hi:
            errors.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas")
        _check_pod_template(g.get("template") or {}, w, errors)
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling: must be true (autoscaling cluster)")
    return errors


def check_manifest(doc: dict[str, Any]) -> list[str]:
    """Problems in one KubeRay manifest; [] when it is well formed."""
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} != 'ray.io/v1'")
    errors += _unknown(doc, {"apiVersion", "kind", "metadata", "spec"}, "")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: missing")
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        errors += check_cluster_spec(spec, "spec")
    elif kind == "RayJob":
        errors += _unknown(spec, _JOB_SPEC, "spec")
        if not spec.get("entrypoint"):
            errors.append("spec.entrypoint: missing")
        if "rayClusterSpec" in spec:
            errors += check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
        elif not spec.get("clusterSelector"):
            errors.append("spec: needs rayClusterSpec or clusterSelector")
        if spec.get("submissionMode", "K8sJobMode") not in (
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        ):
            errors.append(f"spec.submissionMode {spec.get('submissionMode')!r}: unknown")
        if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished only works with shutdownAfterJobFinishes: true")
    elif kind == "RayService":
        errors += _unknown(spec, _SERVICE_SPEC, "spec")
        if not isinstance(spec.get("serveConfigV2"), str):
            errors.append("spec.serveConfigV2: must be a YAML string")
        errors += check_cluster_spec(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
        strategy = (spec.get("upgradeStrategy") or {}).get("type")
        if strategy not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            errors.append(f"spec.upgradeStrategy.type {strategy!r}: unknown")
    else:
        errors.append(f"kind {kind!r}: expected RayCluster, RayJob or RayService")
    return errors


def _manifests() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for i, d in enumerate(docs):
            out[f"{path.name}#{i}"] = d
    return out


MANIFESTS = _manifests()


def test_expected_manifests_exist():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in MANIFESTS.values())
    assert ("RayCluster", "tnlbt") in kinds
    assert ("RayService", "tnlbt-search") in kinds
    stages = {d["metadata"]["labels"]["tnlbt/stage"] for d in MANIFESTS.values() if d["kind"] == "RayJob"}
    assert stages == {"preprocess", "train", "index"}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_is_well_formed(name):
    assert check_manifest(MANIFESTS[name]) == []


def test_manifest_checker_catches_mistakes():
    """The structural checker must fail on the mistakes it exists for (a no-op checker would pass)."""
    good = next(d for d in MANIFESTS.values() if d["kind"] == "RayCluster")
    assert check_manifest(good) == []
    cases = {
        "spec.workerGroupSpec": lambda d: d["spec"].update(workerGroupSpec=[]),  # typo: missing "s"
        "rayVersion": lambda d: d["spec"].update(rayVersion="2.9.0"),
        "num-cpus": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "maxReplicas": lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        "image": lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            image="rayproject/ray:2.9.0-py311"
        ),
        "apiVersion": lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        # A mount of a volume the pod does not declare: one added to the head, and the training group's
        # /dev/shm after its volume is dropped.
        "'nope': no such volume": lambda d: (
            d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            .setdefault("volumeMounts", [])
            .append({"name": "nope", "mountPath": "/nope"})
        ),
        "'dshm': no such volume": lambda d: _group(d["spec"], "gpu-train")["template"]["spec"].pop("volumes"),
    }
    for needle, mutate in cases.items():
        bad = copy.deepcopy(good)
        mutate(bad)
        errors = check_manifest(bad)
        assert any(needle in e for e in errors), (needle, errors)


def _group(cluster_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name)


# -- RayJobs: the commands are real tnlbt commands ------------------------------------------------------
def _jobs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["tnlbt/stage"]: d for d in MANIFESTS.values() if d["kind"] == "RayJob"}


@pytest.mark.parametrize("stage", ["preprocess", "train", "index"])
def test_rayjob_entrypoint_parses_with_the_cli(stage):
    from tnlbt.cli import build_parser

    argv = shlex.split(_jobs()[stage]["spec"]["entrypoint"])
    assert argv[0] == "tnlbt" and argv[1] == stage
    args = build_parser().parse_args(argv[1:])
    assert args.command == stage
    for value in vars(args).values():  # every path is shared storage, not a pod's local disk
        if isinstance(value, str) and value.startswith(("data/", "runs/", "/tmp")):
            pytest.fail(f"{stage}: local path {value!r} in a cluster job")


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_rayjob_config_overrides_validate(stage):
    from tnlbt.cli import build_parser
    from tnlbt.config import Config, list_presets

    args = build_parser().parse_args(shlex.split(_jobs()[stage]["spec"]["entrypoint"])[1:])
    preset = args.config if args.config in list_presets() else None
    cfg = Config.load(preset, args.overrides)  # raises ConfigError on a typo in section.key
    if stage == "train":
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8
        assert cfg.train.runs_dir.startswith(("s3://", "gs://")), cfg.train.runs_dir


def test_rayjob_runtime_env_matches_shared_runtime_env():
    from ray.runtime_env import RuntimeEnv

    shared = _load(CLUSTER / "runtime_env.yaml")
    for stage, job in _jobs().items():
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert set(env) <= RuntimeEnv.known_fields, stage
        RuntimeEnv(**env)
        assert env["env_vars"] == shared["env_vars"], stage


def test_shared_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = _load(CLUSTER / "runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert "pip" not in env and "uv" not in env, "packages come from the image at the pins, not per job"
    for heavy in (".venv", "data/", "runs/"):
        assert heavy in env["excludes"], heavy


# -- RayService == serve/config.yaml ------------------------------------------------------------------
def _service() -> dict[str, Any]:
    return next(d for d in MANIFESTS.values() if d["kind"] == "RayService")


def _serve_validate(cfg: dict[str, Any]) -> Any:
    """ServeDeploySchema validation plus an unknown-key check (the schema itself ignores unknown keys)."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def fields(model: Any) -> set[str]:
        return set(getattr(model, "model_fields", None) or model.__fields__)

    unknown = [k for k in cfg if k not in fields(ServeDeploySchema)]
    for app in cfg.get("applications") or []:
        unknown += [f"{app.get('name')}.{k}" for k in app if k not in fields(ServeApplicationSchema)]
        for dep in app.get("deployments") or []:
            unknown += [
                f"{app.get('name')}.{dep.get('name')}.{k}" for k in dep if k not in fields(DeploymentSchema)
            ]
    if unknown:
        raise ValueError(f"unknown serve config keys: {unknown}")
    if hasattr(ServeDeploySchema, "model_validate"):
        return ServeDeploySchema.model_validate(cfg)
    return ServeDeploySchema.parse_obj(cfg)  # pragma: no cover - pydantic v1


def test_rayservice_serve_config_parses():
    cfg = yaml.safe_load(_service()["spec"]["serveConfigV2"])
    assert _serve_validate(cfg).applications, "no applications"
    # The validation must be able to fail: unknown keys, a missing import_path, duplicate applications.
    for needle, mutate in {
        "bogus": lambda c: c["applications"][0].update(bogus=1),
        "autoscaling_confg": lambda c: c["applications"][0].update(
            deployments=[{"name": "TextEncoder", "autoscaling_confg": {}}]
        ),
        "import_path": lambda c: c["applications"][0].pop("import_path"),
        "multiple configs": lambda c: c["applications"].append(copy.deepcopy(c["applications"][0])),
    }.items():
        bad = copy.deepcopy(cfg)
        mutate(bad)
        with pytest.raises(Exception, match=needle):
            _serve_validate(bad)


# Per-environment values: where the trained run and the Qdrant server are on this cluster. Everything else in
# the RayService's applications must equal serve/config.yaml.
_ENV_ARGS = {"run", "qdrant_url", "qdrant_path", "gpus"}


def _strip_env_args(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = copy.deepcopy(apps)
    for app in out:
        for k in _ENV_ARGS & set(app.get("args") or {}):
            app["args"][k] = "<per-environment>"
    return out


def test_rayservice_serve_config_equals_serve_config_yaml():
    path = ROOT / "serve" / "config.yaml"
    if not path.exists():
        pytest.skip("serve/config.yaml not written yet")
    ours = yaml.safe_load(_service()["spec"]["serveConfigV2"])
    theirs = _load(path)
    _serve_validate(theirs)
    assert _strip_env_args(ours["applications"]) == _strip_env_args(theirs["applications"]), (
        "cluster/kuberay/rayservice.yaml serveConfigV2 differs from serve/config.yaml beyond "
        f"{sorted(_ENV_ARGS)}; copy serve/config.yaml's applications into it"
    )
    # The cluster values point at the bucket and the in-cluster Qdrant, not at a laptop's folders.
    for app in ours["applications"]:
        assert str(app["args"]["run"]).startswith("s3://"), app["name"]
        if "qdrant_url" in app["args"]:
            assert str(app["args"]["qdrant_url"]).startswith("http://qdrant."), app["name"]


def test_serve_config_comparison_can_fail():
    ours = yaml.safe_load(_service()["spec"]["serveConfigV2"])["applications"]
    changed = copy.deepcopy(ours)
    changed[0]["args"]["max_replicas"] = 999
    assert _strip_env_args(changed) != _strip_env_args(ours)
    changed = copy.deepcopy(ours)
    changed[0]["args"]["run"] = "/elsewhere"  # a per-environment value: allowed to differ
    assert _strip_env_args(changed) == _strip_env_args(ours)


# -- storage: the bucket, never a shared volume ------------------------------------------------------------
# argparse destinations of the tnlbt commands that name a file or folder, and config keys that do.
_PATH_DESTS = ("data", "images", "out", "run", "resume", "qdrant_path")
_PATH_KEYS = ("data.raw_dir", "data.image_root", "data.processed_dir", "train.runs_dir")


def _path_args(entrypoint: str) -> dict[str, str]:
    """The path arguments of a ``tnlbt`` command line (flags and ``section.key=value`` overrides)."""
    from tnlbt.cli import build_parser

    args = build_parser().parse_args(shlex.split(entrypoint)[1:])
    out = {d: getattr(args, d) for d in _PATH_DESTS if getattr(args, d, None)}
    for item in getattr(args, "overrides", None) or []:
        key, _, value = item.partition("=")
        if key in _PATH_KEYS:
            out[key] = value
    return out


def _bucket_layout() -> dict[str, str]:
    """TNLBT_RAW / TNLBT_PROCESSED / TNLBT_RUNS of ray_cluster.yaml: the layout every manifest must use."""
    opts = _load(ROOT / "ray_cluster.yaml")["docker"]["run_options"]
    return dict(re.findall(r"-e (TNLBT_\w+)=(\S+)", " ".join(opts)))


def test_no_manifest_uses_a_shared_volume():
    """Every stage reads and writes the bucket: no /mnt/shared paths and no PersistentVolumeClaim left."""
    texts = {p.name: p.read_text() for p in sorted(KUBERAY.glob("*.yaml"))}
    texts["ray_cluster.yaml"] = (ROOT / "ray_cluster.yaml").read_text()
    for name, text in texts.items():
        assert "/mnt/shared" not in text, name
        assert "persistentvolumeclaim" not in text.lower(), name
    for name, doc in MANIFESTS.items():
        found = [k for k in _keys(doc) if k in ("persistentVolumeClaim", "nfs", "hostPath")]
        assert not found, (name, found)


def _keys(x: Any) -> list[str]:
    """Every mapping key anywhere in a parsed YAML document."""
    if isinstance(x, dict):
        return [*x, *(k for v in x.values() for k in _keys(v))]
    if isinstance(x, list):
        return [k for v in x for k in _keys(v)]
    return []


def test_every_tnlbt_path_in_the_manifests_is_an_s3_uri():
    layout = _bucket_layout()
    assert set(layout) >= {"TNLBT_RAW", "TNLBT_PROCESSED", "TNLBT_RUNS"}, layout
    bucket = {urlsplit(u).netloc for k, u in layout.items() if k.startswith("TNLBT_")}
    assert len(bucket) == 1, layout
    (bucket,) = bucket
    paths = {stage: _path_args(job["spec"]["entrypoint"]) for stage, job in _jobs().items()}
    service = yaml.safe_load(_service()["spec"]["serveConfigV2"])["applications"]
    for app in service:
        assert not app["args"].get("qdrant_path"), "an embedded store cannot be shared between pods"
        paths[f"rayservice:{app['name']}"] = {"run": app["args"]["run"]}
    for where, args in paths.items():
        assert args, f"{where}: no path arguments found"
        for key, value in args.items():
            assert value.startswith("s3://"), f"{where}: {key}={value!r} is not an s3:// URI"
            assert urlsplit(value).netloc == bucket, f"{where}: {key}={value!r} not in s3://{bucket}"
    # The stages chain: preprocess writes what train reads, the service serves the run that index loaded into
    # the Qdrant server (--qdrant-url, no embedded store), which is the run train wrote.
    pre, train, index = paths["preprocess"], paths["train"], paths["index"]
    assert pre["data"] == layout["TNLBT_RAW"] and pre["out"] == layout["TNLBT_PROCESSED"]
    # The photos too: without --images, preprocess takes the preset's data.image_root before DATA/images.
    images = pre.get("images") or _preset_data("preprocess").image_root or f"{pre['data']}/images"
    assert images.startswith(f"s3://{bucket}/"), f"preprocess would read photos from {images!r}"
    assert train["data"] == pre["out"] and train["train.runs_dir"] == layout["TNLBT_RUNS"]
    name = shlex.split(_jobs()["train"]["spec"]["entrypoint"])
    run = f"{train['train.runs_dir'].rstrip('/')}/{name[name.index('--name') + 1]}"
    assert index["run"] == run
    assert "--qdrant-url" in _jobs()["index"]["spec"]["entrypoint"]
    for app in service:
        assert app["args"]["run"] == run, app["name"]


def _preset_data(stage: str) -> Any:
    from tnlbt.cli import build_parser
    from tnlbt.config import Config

    args = build_parser().parse_args(shlex.split(_jobs()[stage]["spec"]["entrypoint"])[1:])
    return Config.load(args.config, args.overrides).data


def test_path_check_finds_local_paths():
    """The helper above must see a path wherever the commands take one (a no-op would pass anything)."""
    got = _path_args(
        "tnlbt train --config recipe1m_vit_b16 --data /mnt/shared/p --resume runs/x/checkpoints/last "
        "train.runs_dir=/mnt/shared/runs data.image_root=/img train.epochs=3"
    )
    assert got == {
        "data": "/mnt/shared/p",
        "resume": "runs/x/checkpoints/last",
        "train.runs_dir": "/mnt/shared/runs",
        "data.image_root": "/img",
    }
    assert _path_args("tnlbt index --run s3://b/runs/r --qdrant-path /tmp/q") == {
        "run": "s3://b/runs/r",
        "qdrant_path": "/tmp/q",
    }
    assert _path_args("tnlbt preprocess --data s3://b/raw --images s3://b/img --out s3://b/p") == {
        "data": "s3://b/raw",
        "images": "s3://b/img",
        "out": "s3://b/p",
    }


def test_rayservice_cache_dir_is_an_emptydir_in_every_pod():
    """The app builder passes its TNLBT_CACHE_DIR on to the replicas, so every pod of the serving cluster must
    have the same value, backed by a mounted volume (checkpoints fetched from the bucket land there)."""
    spec = _service()["spec"]["rayClusterConfig"]
    pods = [("head", spec["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    values = set()
    for where, tpl in pods:
        volumes = {v["name"]: v for v in tpl["spec"].get("volumes") or []}
        for c in tpl["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            cache = env.get("TNLBT_CACHE_DIR")
            assert cache, f"{where}: TNLBT_CACHE_DIR not set"
            values.add(cache)
            mounts = [
                m for m in c.get("volumeMounts") or [] if (cache + "/").startswith(m["mountPath"].rstrip("/") + "/")
            ]
            assert mounts, f"{where}: nothing mounted at {cache}"
            assert "emptyDir" in volumes[mounts[0]["name"]], f"{where}: {cache} is not an emptyDir"
    assert len(values) == 1, values


# -- images, Dockerfile, Qdrant -------------------------------------------------------------------------
def test_dockerfile_matches_pins():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu", base
    assert "pip install --no-cache-dir -r requirements/pins.txt" in text
    # The project goes in as a wheel (no editable install: nothing read from a source tree at run time), with
    # --no-deps so it never re-resolves (and swaps) torch.
    assert "pip install --no-cache-dir --no-deps /tmp/tnlbt-wheel/tnlbt-*.whl" in text
    assert " -e ." not in text
    for d in ("tnlbt", "serve", "ui", "configs"):
        assert f"COPY --chown=ray:users {d} /tmp/tnlbt-src/{d}" in text, d
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "data" in ignore


def test_qdrant_compose_matches_client_pin():
    compose = _load(CLUSTER / "qdrant" / "docker-compose.yaml")
    image = compose["services"]["qdrant"]["image"]
    server = re.match(r"qdrant/qdrant:v(\d+)\.(\d+)", image)
    client = re.match(r"(\d+)\.(\d+)", PINS["qdrant-client"])
    assert server and client and server.groups() == client.groups(), (image, PINS["qdrant-client"])
    env = compose["services"]["qdrant"]["environment"]
    assert "QDRANT__SERVICE__API_KEY" in env
    assert any(v.startswith("qdrant_storage:") for v in compose["services"]["qdrant"]["volumes"])


def test_presets_named_in_jobs_exist_or_are_pending():
    """The jobs name the paper-scale preset; once configs/ has it, it must load."""
    from tnlbt.config import Config, list_presets

    if "recipe1m_vit_b16" not in list_presets():
        pytest.skip("configs/recipe1m_vit_b16.yaml not written yet")
    cfg = Config.load("recipe1m_vit_b16")
    assert cfg.model.image_model.startswith("vit_base_patch16")


# -- bench/capacity.py: the arithmetic against a hand-computed twin -------------------------------------
def _capacity():
    import importlib.util
    import sys

    name = "tnlbt_bench_capacity"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "capacity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def test_capacity_marks_everything_missing_without_results(tmp_path, capsys):
    cap = _capacity()
    assert cap.main(["--results", str(tmp_path), "--json"]) == 0
    rows = {r["stage"]: r for r in json_loads(capsys.readouterr().out)}
    assert set(rows) == {"preprocess", "train", "index", "serve"}
    for r in rows.values():
        assert r["status"] == "MISSING" and r["hours"] is None and r["missing"], r
    assert any("no GPU" in m for m in rows["train"]["missing"])


def test_capacity_arithmetic_matches_hand_computation(tmp_path, capsys):
    cap = _capacity()
    (tmp_path / "preprocess.json").write_text(
        json_dumps({"machine": {"cpus": 2}, "run": {"recipes_per_s": 400.0, "images_per_s": 50.0, "cpus": 2}})
    )
    (tmp_path / "train.json").write_text(
        json_dumps({"machine": {"gpu": "A10G"}, "gpu_samples_per_s_per_worker": 120.0})
    )
    (tmp_path / "serve.json").write_text(
        json_dumps({"machine": {"gpu": "A10G"}, "gpu_qps_per_replica": 30.0})
    )
    (tmp_path / "index.json").write_text(
        json_dumps(
            {
                "results": [
                    {"store": "s", "n": 1000, "build_s": 2.0},
                    {"store": "s", "n": 4000, "build_s": 16.0},
                ]
            }
        )
    )
    assert (
        cap.main(
            [
                "--results",
                str(tmp_path),
                "--json",
                "--gpus",
                "8",
                "--cpu-nodes",
                "4",
                "--cores-per-node",
                "32",
                "--qps",
                "100",
                "--price",
                "g5.xlarge=2.0",
            ]
        )
        == 0
    )
    rows = {r["stage"]: r for r in json_loads(capsys.readouterr().out)}
    wl = cap.WORKLOAD
    # Brute-force twins of each formula.
    pre_h = wl["recipes"] / (200.0 * 128) / 3600 + wl["photos"] / (25.0 * 128) / 3600
    assert rows["preprocess"]["hours"] == pytest.approx(pre_h)
    assert rows["preprocess"]["cost_usd"] == pytest.approx(pre_h * 4 * cap.PRICES["m6i.8xlarge"])
    steps = wl["paired_train"] // wl["global_batch"]
    train_h = wl["epochs"] * steps * wl["global_batch"] / (120.0 * 8) / 3600
    assert rows["train"]["hours"] == pytest.approx(train_h)
    assert rows["train"]["cost_usd"] == pytest.approx(train_h * 2 * cap.PRICES["g5.12xlarge"])
    assert rows["serve"]["cost_usd"] == pytest.approx(4 * 2.0 * 720)  # ceil(100 / 30) = 4 replicas
    assert rows["train"]["status"] == rows["serve"]["status"] == rows["preprocess"]["status"] == "ok"
    # Index: the largest size is used, and the slowing rate is reported.
    assert any("4,000 in 16.0 s = 250 vec/s" in a for a in rows["index"]["arithmetic"])
    assert any("falls with size" in a for a in rows["index"]["arithmetic"])


def test_capacity_write_doc_replaces_only_the_marked_table(tmp_path):
    cap = _capacity()
    doc = tmp_path / "cap.md"
    doc.write_text("intro\n<!-- capacity-table:begin -->\nold\n<!-- capacity-table:end -->\noutro\n")
    cap.write_doc(doc, "NEW TABLE")
    want = "intro\n<!-- capacity-table:begin -->\nNEW TABLE\n<!-- capacity-table:end -->\noutro\n"
    assert doc.read_text() == want


def test_capacity_reads_the_preprocess_benchmark_layout(tmp_path, capsys):
    """bench/preprocess.py's layout: throughput keyed by CPU count; the 1-CPU run is the per-core rate."""
    cap = _capacity()
    (tmp_path / "preprocess.json").write_text(json_dumps({"throughput": {
        "1": {"recipes_per_s": 100.0, "images_per_s": 200.0},
        "2": {"recipes_per_s": 150.0, "images_per_s": 300.0}}}))
    assert cap.main(["--results", str(tmp_path), "--json", "--cpu-nodes", "2", "--cores-per-node", "10"]) == 0
    row = next(r for r in json_loads(capsys.readouterr().out) if r["stage"] == "preprocess")
    want = cap.WORKLOAD["recipes"] / (100.0 * 20) / 3600 + cap.WORKLOAD["photos"] / (200.0 * 20) / 3600
    assert row["hours"] == pytest.approx(want)
    assert any("0.75 of linear" in a for a in row["arithmetic"])


def test_capacity_stage_model_photo_size_and_cpu_rows(tmp_path, capsys):
    """Amdahl preprocess (serial read + parallel stages, photo-size correction) and the CPU index/serve rows,
    against the same arithmetic written out by hand."""
    cap = _capacity()
    run = {"recipes": 1000, "photos_ok": 2000,
           "timings": {"read_s": 0.5, "vocab_s": 2.0, "process_cpu_s": 4.0}}
    (tmp_path / "preprocess.json").write_text(json_dumps({
        "throughput": {"1": {"recipes_per_s": 100.0, "images_per_s": 200.0, "runs": [run]}},
        "decode": {"by_source_px": {"128": {"cpu_ms_per_photo": 1.0}, "512": {"cpu_ms_per_photo": 3.0}}}}))
    embed = [{"part": p, "precision": pr, "batch": b, "torch_threads": 1, "vectors_per_cpu_s": v,
              "ms_per_vector": ms}
             for p, pr, b, v, ms in [("image", "fp32", 16, 2.0, 500.0), ("image", "bf16", 16, 8.0, 150.0),
                                     ("image", "bf16", 1, 7.0, 140.0), ("recipe", "fp32", 16, 30.0, 40.0),
                                     ("recipe", "fp32", 1, 25.0, 40.0)]]
    (tmp_path / "model.json").write_text(json_dumps({"embed": {"results": embed}}))
    (tmp_path / "index.json").write_text(json_dumps({"results": [{"store": "edge", "n": 1000, "build_s": 10.0}]}))
    (tmp_path / "serve.json").write_text(json_dumps({"machine": {"cpus": 2}, "results": [
        {"endpoint": "t", "concurrency": 8, "rps": 100.0, "errors": 0},
        {"endpoint": "t", "concurrency": 32, "rps": 400.0, "errors": 3}]}))  # errors: not a valid rate
    args = ["--results", str(tmp_path), "--json", "--cpu-nodes", "2", "--cores-per-node", "10", "--qps", "300"]
    assert cap.main(args) == 0
    rows = {r["stage"]: r for r in json_loads(capsys.readouterr().out)}
    wl, cores = cap.WORKLOAD, 20
    per_photo = 4.0 / 2000 + (3.0 - 1.0) / 1000  # task CPU s per photo + the 512 px extra decode
    want = (wl["recipes"] * 0.5 / 1000 + wl["recipes"] * 2.0 / 1000 / cores + wl["photos"] * per_photo / cores) / 3600
    assert rows["preprocess"]["hours"] == pytest.approx(want)
    assert rows["preprocess"]["cost_usd"] == pytest.approx(want * 2 * cap.PRICES["m6i.8xlarge"])
    embed_h = (wl["photos"] / (8.0 * cores) + wl["recipes"] / (30.0 * cores)) / 3600  # faster precision at batch 16
    load_h = wl["index_vectors"] / (1000 / 10.0) / 3600
    assert rows["index"]["status"] == "CPU"
    assert rows["index"]["hours"] == pytest.approx(embed_h + load_h)
    # a photo query (the slower encoder, its faster precision at batch 1: 140 ms) + 2 cores / 100 req/s overhead
    per_node = 32 / (140.0 / 1000 + 2 / 100.0)
    assert rows["serve"]["status"] == "CPU"
    assert rows["serve"]["cost_usd"] == pytest.approx(math.ceil(300 / per_node) * cap.PRICES["m6i.8xlarge"] * 720)


def test_capacity_index_load_uses_the_default_settings_build(tmp_path, capsys):
    """With a trade-off sweep present, the load time comes from the build with the store's default settings."""
    cap = _capacity()
    defaults = {"quantization": "int8", "on_disk_vectors": True, "hnsw_ef": 256, "rescore": True, "oversampling": 2.0}
    run = {"n": 1000, "defaults": defaults,
           "builds": {"f32": {"variant": "f32", "settings": {"quantization": "none", "on_disk_vectors": False},
                              "build_s": 100.0},
                      "i8d": {"variant": "i8d", "settings": {"quantization": "int8", "on_disk_vectors": True},
                              "build_s": 4.0}},
           "rows": [{"variant": "i8d", "setting": "a", "hnsw_ef": 256, "rescore": False, "oversampling": 2.0,
                     "recall_at_10": 0.5, "p50_ms": 1.0},
                    {"variant": "i8d", "setting": "b", "hnsw_ef": 256, "rescore": True, "oversampling": 2.0,
                     "recall_at_10": 0.99, "p50_ms": 0.4}]}
    (tmp_path / "index.json").write_text(json_dumps({"results": [{"store": "edge", "n": 1000, "build_s": 50.0}],
                                                     "tradeoff": {"runs": [run]}}))
    embed = [{"part": p, "precision": "fp32", "batch": b, "torch_threads": 1, "vectors_per_cpu_s": 10.0,
              "ms_per_vector": 100.0} for p in ("image", "recipe") for b in (1, 16)]
    (tmp_path / "model.json").write_text(json_dumps({"embed": {"results": embed}}))
    assert cap.main(["--results", str(tmp_path), "--json", "--cpu-nodes", "1", "--cores-per-node", "10"]) == 0
    row = next(r for r in json_loads(capsys.readouterr().out) if r["stage"] == "index")
    wl = cap.WORKLOAD
    want = (wl["photos"] + wl["recipes"]) / (10.0 * 10) / 3600 + wl["index_vectors"] / (1000 / 4.0) / 3600
    assert row["hours"] == pytest.approx(want)
    assert any("recall@10 0.99, p50 0.4 ms (b)" in a for a in row["arithmetic"])


def test_capacity_gpu_rows_from_gpu_check_keys(tmp_path, capsys):
    """What bench/gpu_check.py merges into the results turns the GPU rows into computed ones (hand twin)."""
    cap = _capacity()
    (tmp_path / "train.json").write_text(json_dumps({"gpu_samples_per_s_per_worker": 200.0}))
    (tmp_path / "index.json").write_text(json_dumps({
        "results": [{"store": "edge", "n": 1000, "build_s": 10.0}],
        "embed_image_per_s_per_gpu": 1000.0, "embed_recipe_per_s_per_gpu": 4000.0, "embed_machine": {"gpu": "X"}}))
    (tmp_path / "serve.json").write_text(json_dumps({"gpu_qps_per_replica": 50.0}))
    assert cap.main(["--results", str(tmp_path), "--json", "--gpus", "8", "--index-gpu-nodes", "2",
                     "--qps", "120"]) == 0
    rows = {r["stage"]: r for r in json_loads(capsys.readouterr().out)}
    wl = cap.WORKLOAD
    steps = wl["paired_train"] // wl["global_batch"]
    assert rows["train"]["status"] == "ok"
    assert rows["train"]["hours"] == pytest.approx(wl["epochs"] * steps * wl["global_batch"] / (200.0 * 8) / 3600)
    embed_h = wl["photos"] / (1000.0 * 2) / 3600 + wl["recipes"] / (4000.0 * 2) / 3600
    load_h = wl["index_vectors"] / (1000 / 10.0) / 3600
    assert rows["index"]["status"] == "ok"
    assert rows["index"]["hours"] == pytest.approx(embed_h + load_h)
    assert rows["serve"]["status"] == "ok"
    assert rows["serve"]["cost_usd"] == pytest.approx(math.ceil(120 / 50.0) * cap.PRICES["g5.xlarge"] * 720)
