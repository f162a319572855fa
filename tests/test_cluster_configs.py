"""The image and the cluster configs: each validates against the schema its tool enforces, and says
what the job needs (the image the Dockerfile builds, autoscaling, a GPU group, a CPU-free head, pods
that fit their nodes, credentials from the cluster's identity only).

No Ray cluster, no network, no docker: the configs are only read. A config that fails here is one
that `ray up` or the Kubernetes API server would refuse, or one that would start and do the wrong
thing (pods never scheduled, workers never added, keys in plain text).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

from ngt_ray.options import shared_data_root

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
DOCKERFILE = ROOT / "Dockerfile"
RAY_UP_CONFIGS = sorted(CLUSTER.glob("ray-up-*.yaml"))
KUBERAY_MANIFESTS = sorted(CLUSTER.glob("kuberay-*.yaml"))
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB: the C parser reads them in 0.5 s
# the manifests holding a RayCluster or RayJob (the ServiceAccount's file has no CRD to meet)
RAY_MANIFESTS = [p.name for p in KUBERAY_MANIFESTS
                 if {"RayCluster", "RayJob"} & {d.get("kind") for d in yaml.safe_load_all(p.read_text()) if d}]

# The node types the configs name: (vCPU, memory GiB, GPUs), from the EC2 instance type pages.
NODE_TYPES: dict[str, tuple[int, int, int]] = {
    "m6i.2xlarge": (8, 32, 0),
    "c6i.8xlarge": (32, 64, 0),
    "g6.4xlarge": (16, 64, 1),  # 1 NVIDIA L4
}
# What a Kubernetes node keeps for itself and its daemonsets (kubelet and system reservations,
# eviction threshold, CNI, kube-proxy, device plugin, CSI): on EKS about 0.1 vCPU and 1-3 GiB of
# reservations alone, plus the daemonsets' requests. A pod must leave at least this much free.
K8S_HEADROOM_CPU = 1.0
K8S_HEADROOM_GIB = 4.0
# KubeRay's autoscaler sidecar when autoscalerOptions.resources is not given.
_AUTOSCALER_DEFAULT = {"cpu": "500m", "memory": "512Mi"}

CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "GOOGLE_APPLICATION_CREDENTIALS")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


# --- reading the files ---------------------------------------------------------------------------

def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    """The Ray version pyproject.toml pins (``ray[data,default]==2.60.0``): image, CRDs' rayVersion
    and the base image must all run this one."""
    for dep in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no ray version (ray[...]==X)")


def pinned_python_tag() -> str:
    """``py311`` for ``requires-python = ">=3.11,<3.12"``: the one minor version pyproject allows,
    as Ray's image tags spell it."""
    spec = SpecifierSet(_pyproject()["project"]["requires-python"])
    minors = [m for m in range(6, 20) if spec.contains(f"3.{m}.0")]
    assert len(minors) == 1, f"requires-python {spec} allows {len(minors)} minor versions; an image has one"
    return f"py3{minors[0]}"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_Loader) if doc is not None]


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, with ``\\`` continuations joined and comment lines
    dropped (also inside a continuation, as Docker does). Enough to check a Dockerfile's structure;
    heredocs are not supported (this Dockerfile has none)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment or blank line; inside a continuation Docker skips it too
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"the Dockerfile ends inside a continuation: {pending!r}"
    return instructions


DOCKERFILE_INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
                           "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
                           "WORKDIR"}


def _substitute(text: str, args: dict[str, str]) -> str:
    """Docker's ``$VAR`` / ``${VAR}`` substitution from ARG values."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in args, f"{text!r} uses ${name}, which no ARG before it defines"
        return args[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def base_image(instructions: list[tuple[str, str]], build_args: dict[str, str] | None = None) -> str:
    """The image the (single-stage) Dockerfile starts from, with its ARG defaults or ``build_args``."""
    args: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            args.update(build_args or {})
            return _substitute(rest.split()[0], args)
    raise AssertionError("the Dockerfile has no FROM")


def documented_image() -> str:
    """The image name and tag that the Dockerfile's own build command gives (every ``docker build``
    line in its header must name the same one): what every cluster config must run."""
    tags = set(re.findall(r"docker build\b.*?\s-t\s+(\S+)", DOCKERFILE.read_text()))
    assert len(tags) == 1, f"the Dockerfile documents {len(tags)} image names ({sorted(tags)}); expected one"
    return tags.pop()


# --- Kubernetes manifests: CRD schemas -----------------------------------------------------------

def kuberay_schema_dir() -> Path:
    """The KubeRay CRDs beside the shared data (``$NGT_RAY_DATA/../schemas/kuberay``). Missing
    schemas fail: a skip would let a green run hide that the manifests were never validated."""
    folder = shared_data_root().parent / "schemas" / "kuberay"
    needed = [folder / "ray.io_rayclusters.yaml", folder / "ray.io_rayjobs.yaml"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.fail(f"KubeRay CRD schemas not found: {', '.join(missing)}. They come with the shared data "
                    f"(see {folder / 'README.md'}); set NGT_RAY_DATA to the shared data folder.", pytrace=False)
    return folder


def kube_to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 schema from a CRD as JSON Schema, with Kubernetes' own rules made explicit:

    - ``x-kubernetes-int-or-string: true``: integer or string (resource quantities, ports);
    - ``nullable: true``: null allowed;
    - an object schema with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` rejects fields it does not name, as the API server
      does under strict field validation (kubectl's default since 1.27). Without this a misspelt
      field such as ``enableInTreeAutoScaling`` would pass here and be silently dropped there.

    ``x-kubernetes-validations`` (CEL rules) are not evaluated.
    """
    if isinstance(node, list):
        return [kube_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: kube_to_jsonschema(value) if key in ("properties", "items", "additionalProperties", "anyOf",
                                                      "allOf", "oneOf", "not") else value
           for key, value in node.items()}
    if "properties" in out:
        out["properties"] = {name: kube_to_jsonschema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


_validators: dict[str, jsonschema.protocols.Validator] = {}


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator for ``kind`` (RayCluster, RayJob) from the ray.io/v1 version of its CRD."""
    if kind not in _validators:
        path = kuberay_schema_dir() / f"ray.io_{kind.lower()}s.yaml"
        crd = yaml.load(path.read_text(), Loader=_Loader)
        assert crd["spec"]["names"]["kind"] == kind, f"{path} defines {crd['spec']['names']['kind']}, not {kind}"
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = kube_to_jsonschema(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _validators[kind] = jsonschema.Draft7Validator(schema)
    return _validators[kind]


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every way ``doc`` breaks its CRD (empty when valid), each with where it is."""
    assert doc.get("apiVersion") == "ray.io/v1", f"{doc.get('kind')} should be ray.io/v1, not {doc.get('apiVersion')}"
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def kuberay_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in KUBERAY_MANIFESTS for doc in load_yaml_docs(path)]


def ray_docs() -> list[tuple[Path, dict[str, Any]]]:
    """The RayCluster and RayJob documents of cluster/kuberay-*.yaml."""
    return [(path, doc) for path, doc in kuberay_docs() if doc.get("kind") in ("RayCluster", "RayJob")]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """A RayCluster's spec, or the spec of the cluster a RayJob starts."""
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and each worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (``"500m"`` -> 0.5, ``"52Gi"`` -> bytes)."""
    match = _QUANTITY.match(str(value))
    assert match and match.group(2) in _SUFFIX, f"not a resource quantity: {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def pod_requests(doc: dict[str, Any], name: str, group: dict[str, Any]) -> dict[str, float]:
    """What one pod of ``group`` asks its node for (cpu, memory in GiB, GPUs), summed over its
    containers, with KubeRay's autoscaler sidecar on the head when autoscaling is on."""
    resources = [c.get("resources", {}) for c in group["template"]["spec"]["containers"]]
    spec = cluster_spec(doc)
    if name == "head" and spec.get("enableInTreeAutoscaling"):
        sidecar = spec.get("autoscalerOptions", {}).get("resources")
        resources.append(sidecar if sidecar else {"requests": _AUTOSCALER_DEFAULT})
    total = {"cpu": 0.0, "memory": 0.0, "nvidia.com/gpu": 0.0}
    for res in resources:
        asked = res.get("requests") or res.get("limits") or {}  # Kubernetes: requests default to limits
        for key in total:
            total[key] += quantity(asked.get(key, 0))
    return {"cpu": total["cpu"], "memory_gib": total["memory"] / 2**30, "gpu": total["nvidia.com/gpu"]}


def strings(node: Any) -> Iterator[str]:
    """Every key and string value in a parsed document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def test_cluster_folder_has_the_configs() -> None:
    """The globs below find something: an empty parametrization would pass without checking."""
    assert RAY_UP_CONFIGS, "no cluster/ray-up-*.yaml"
    kinds = {doc.get("kind") for _, doc in kuberay_docs()}
    assert {"RayCluster", "RayJob", "ServiceAccount"} <= kinds, f"cluster/kuberay-*.yaml hold {kinds}"


# --- the Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_parses_into_known_instructions() -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    unknown = [keyword for keyword, _ in instructions if keyword not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 1, f"expected one build stage, found FROM {froms}"


def test_dockerfile_parser_joins_continuations_and_skips_comments() -> None:
    """The parser the checks rely on reads continuations and comments as Docker does."""
    text = "# c\nARG A=1\nRUN echo a \\\n    # inside\n    && echo b\nfrom x:${A}\n"
    assert parse_dockerfile(text) == [("ARG", "A=1"), ("RUN", "echo a && echo b"), ("FROM", "x:${A}")]
    assert base_image(parse_dockerfile(text)) == "x:1"


def test_dockerfile_base_is_the_official_ray_image_at_the_pins() -> None:
    """Ray and Python in the image are the ones pyproject pins: the driver that submits and the
    cluster that runs must agree on both, or Ray refuses to connect."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    expected = f"rayproject/ray:{pinned_ray_version()}-{pinned_python_tag()}-cpu"
    assert base_image(instructions) == expected
    # the GPU variant is the same image on Ray's CUDA base, selected by a build argument
    gpu = base_image(instructions, {"RAY_VARIANT": "cu130"})
    assert gpu == f"rayproject/ray:{pinned_ray_version()}-{pinned_python_tag()}-cu130"


def _pip_installs(run: str) -> Iterator[list[str]]:
    """The arguments of each ``pip install`` in a RUN's shell command (split at ``&&``, ``;``, ``|``
    outside quotes, as the shell would)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for token in [*lexer, ";"]:
        if token not in ("&&", "||", ";", "|"):
            command.append(token)
            continue
        for prefix in (["pip", "install"], ["python", "-m", "pip", "install"]):
            if command[:len(prefix)] == prefix:
                yield command[len(prefix):]
        command = []


def test_dockerfile_installs_the_project_with_pyprojects_pins() -> None:
    """``pip install`` of the folder pyproject.toml was copied to (so its pins apply, nowhere
    duplicated), after the package itself is copied in; no version is pinned in the Dockerfile."""
    workdir = PurePosixPath("/")
    copied: dict[str, PurePosixPath] = {}  # source -> where it lands
    installed: list[PurePosixPath] = []
    for keyword, rest in parse_dockerfile(DOCKERFILE.read_text()):
        if keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":
            *sources, dest = [w for w in shlex.split(rest) if not w.startswith("--")]
            for source in sources:
                target = workdir / dest
                copied[source] = target / source if dest.endswith("/") or len(sources) > 1 else target
        elif keyword == "RUN":
            for args in _pip_installs(rest):
                assert not any("==" in a for a in args), f"a version pinned in the Dockerfile: {args}"
                targets = [a for a in args if not a.startswith("-")]
                if "ngt_ray" in copied:  # the package is in: this install is the real one
                    installed += [workdir / t for t in targets]
    assert "pyproject.toml" in copied and "ngt_ray" in copied, f"the Dockerfile copies {sorted(copied)}"
    project = copied["pyproject.toml"].parent
    assert copied["ngt_ray"] == project / "ngt_ray", "ngt_ray/ must sit beside pyproject.toml"
    assert project in installed, f"no `pip install` of {project} (pyproject.toml's folder) after ngt_ray/ is copied"


def test_dockerignore_keeps_the_context_small_and_the_package_in() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for heavy in (".venv", ".git", ".devbundle", ".gpudata", ".aside", "*.csv"):
        assert heavy in patterns, f".dockerignore does not exclude {heavy}"
    for needed in ("pyproject.toml", "README.md", "ngt_ray", "ngt_ray/checkpoints"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the image needs"


def test_packaged_checkpoints_go_into_the_image() -> None:
    """The wheel `pip install` builds carries the checkpoints (package-data), so the image has them."""
    package_data = _pyproject()["tool"]["setuptools"]["package-data"]["ngt_ray"]
    assert {"checkpoints/*.pt", "checkpoints/*.json"} <= set(package_data)
    assert list((ROOT / "ngt_ray" / "checkpoints").glob("*.pt")), "no checkpoints to package"


def test_build_command_tags_the_project_version() -> None:
    image = documented_image()
    assert image.rsplit(":", 1)[-1] == _pyproject()["project"]["version"], f"{image}: tag the project's version"
    readme = CLUSTER / "README.md"
    assert readme.is_file(), "cluster/README.md documents build, push and deploy"
    assert f"-t {image} ." in readme.read_text(), f"cluster/README.md should build {image} as the Dockerfile does"


# --- ray up ---------------------------------------------------------------------------------------

def _ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_passes_rays_schema(path: Path) -> None:
    """The schema shipped in the ray package, on the file as written and after Ray's own preparation
    (defaults merged, node types filled: what `ray up` validates before it asks the cloud)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("break_it", ["no resources", "misspelt min_workers", "float CPU"])
def test_ray_schema_rejects_a_broken_config(break_it: str) -> None:
    """The validation above can fail: without explicit resources (the issue's failure), with an
    unknown field in a node type, or with a resource that is not an integer."""
    config = yaml.safe_load(RAY_UP_CONFIGS[0].read_text())
    node = next(n for name, n in config["available_node_types"].items() if name != config["head_node_type"])
    if break_it == "no resources":
        del node["resources"]
    elif break_it == "misspelt min_workers":
        node["min_worker"] = node.pop("min_workers")
    else:
        node["resources"]["CPU"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_runs_the_image_and_installs_nothing(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    assert config["docker"]["image"] == documented_image()
    for key in ("head_image", "worker_image"):
        assert config["docker"].get(key, documented_image()) == documented_image()
    assert not config.get("file_mounts"), "file_mounts copy the checkout (and its .venv) to every node"
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands") for c in config.get(key, [])]
    commands += [c for node in config["available_node_types"].values() for c in node.get("worker_setup_commands", [])]
    assert not [c for c in commands if "pip" in c or "conda" in c], f"installs at boot: {commands}"
    # set explicitly: Ray's AWS defaults otherwise pip-install on every boot
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in config, f"{key} unset: Ray's provider defaults would run"


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_node_types_match_their_instances(path: Path) -> None:
    """Explicit resources equal to the instance's (the head's CPU 0), a GPU type, sane bounds, and a
    head profile distinct from the workers' (only the head launches instances)."""
    config = yaml.safe_load(path.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no work lands there"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for name, node in workers.items():
        instance = node["node_config"]["InstanceType"]
        assert instance in NODE_TYPES, f"{name}: add {instance} to NODE_TYPES"
        cpus, _, gpus = NODE_TYPES[instance]
        assert node["resources"].get("CPU") == cpus, f"{name}: {instance} has {cpus} vCPU"
        assert node["resources"].get("GPU", 0) == gpus, f"{name}: {instance} has {gpus} GPU"
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"]
    assert any(n["resources"].get("GPU", 0) > 0 for n in workers.values()), "no GPU worker type"
    assert sum(n.get("min_workers", 0) for n in workers.values()) <= config["max_workers"]
    profile = head["node_config"].get("IamInstanceProfile")
    worker_profiles = [n["node_config"].get("IamInstanceProfile") for n in workers.values()]
    assert profile and all(worker_profiles) and profile not in worker_profiles, \
        "head and workers need their own instance profiles (only the head launches EC2 instances)"


# --- KubeRay --------------------------------------------------------------------------------------

def test_kuberay_schemas_are_found() -> None:
    """Checked on its own so a missing folder reads as one clear failure."""
    assert kuberay_schema_dir().is_dir()


def _docs_in(name: str) -> list[dict[str, Any]]:
    """The Ray resources (RayCluster, RayJob) of one manifest file; a file with none fails."""
    docs = [doc for path, doc in ray_docs() if path.name == name]
    assert docs, f"{name} holds no RayCluster or RayJob"
    return docs


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_kuberay_manifest_matches_the_crd(name: str) -> None:
    docs = _docs_in(name)
    for doc in docs:
        errors = crd_errors(doc)
        assert not errors, f"{name}: {doc['kind']} breaks its CRD:\n" + "\n".join(errors)


def _rename(node: dict[str, Any], old: str, new: str) -> None:
    node[new] = node.pop(old)


BREAKAGES = {
    "misspelt field": lambda d: _rename(cluster_spec(d), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    "replicas not a number": lambda d: cluster_spec(d)["workerGroupSpecs"][0].update(replicas="many"),
    "cpu not a quantity": lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]
    ["resources"]["limits"].update(cpu="lots"),
    "group without a name": lambda d: cluster_spec(d)["workerGroupSpecs"][0].pop("groupName"),
    "rayStartParams value not a string": lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"]
    .update({"num-cpus": 0}),
    "unknown container field": lambda d: cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]
    .update(imagePullPolice="Always"),
}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_crd_validation_rejects_a_broken_manifest(kind: str, breakage: str) -> None:
    """The CRD check can fail: each of these breaks a valid manifest, and each must be refused."""
    doc = copy.deepcopy(next(d for _, d in ray_docs() if d["kind"] == kind))
    assert not crd_errors(doc)
    BREAKAGES[breakage](doc)
    assert crd_errors(doc), f"{breakage} passed the {kind} CRD"


def test_int_or_string_accepts_both() -> None:
    """Quantities may be written 14 or "14" (x-kubernetes-int-or-string), as the API server takes them."""
    doc = copy.deepcopy(next(d for _, d in ray_docs() if d["kind"] == "RayCluster"))
    limits = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 6
    assert not crd_errors(doc)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_kuberay_cluster_autoscales_with_a_gpu_group_and_a_cpu_free_head(name: str) -> None:
    docs = _docs_in(name)
    for doc in docs:
        spec = cluster_spec(doc)
        assert spec.get("rayVersion") == pinned_ray_version()
        assert spec.get("enableInTreeAutoscaling") is True, "without it min/maxReplicas do nothing"
        assert "autoscalerOptions" in spec
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "head must run no tasks"
        gpu_groups = []
        for group in spec["workerGroupSpecs"]:
            low, high = group["minReplicas"], group["maxReplicas"]
            assert 0 <= low <= group.get("replicas", low) <= high and high >= 1, f"{group['groupName']} bounds"
            limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
            if any(quantity(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits):
                gpu_groups.append(group["groupName"])
        assert gpu_groups, f"{name}: no worker group has an nvidia.com/gpu limit"


def test_every_container_runs_the_documented_image() -> None:
    image = documented_image()
    for path, doc in ray_docs():
        spec = cluster_spec(doc)
        for name, group in groups(doc):
            for container in group["template"]["spec"]["containers"]:
                assert container["image"] == image, f"{path.name} {name}/{container['name']}: {container['image']}"
        # the autoscaler sidecar and the RayJob submitter default to the head's image; if set, the same
        assert spec.get("autoscalerOptions", {}).get("image", image) == image
        for container in doc["spec"].get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
            assert container["image"] == image


def test_pods_fit_their_nodes() -> None:
    """Each pod's requests, plus the room Kubernetes keeps on the node, fit the instance type its
    nodeSelector names; requests equal limits (Ray sizes itself from the limits)."""
    for path, doc in ray_docs():
        for name, group in groups(doc):
            pod = group["template"]["spec"]
            instance = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
            assert instance in NODE_TYPES, f"{path.name} {name}: nodeSelector names {instance}; add it to NODE_TYPES"
            cpus, gib, gpus = NODE_TYPES[instance]
            asked = pod_requests(doc, name, group)
            where = f"{path.name} {name} on {instance} ({cpus} vCPU, {gib} GiB, {gpus} GPU) asks {asked}"
            assert asked["cpu"] + K8S_HEADROOM_CPU <= cpus, where
            assert asked["memory_gib"] + K8S_HEADROOM_GIB <= gib, where
            assert asked["gpu"] <= gpus, where
            for container in pod["containers"]:
                res = container.get("resources", {})
                assert res.get("requests") == res.get("limits"), f"{where}: requests != limits"


def test_credentials_come_from_the_service_account() -> None:
    """Every pod runs as the ServiceAccount the manifests define, which carries a cloud identity
    (IRSA role or GKE workload identity); no file in cluster/ holds a key or passes one by env."""
    accounts = {doc["metadata"]["name"]: doc for _, doc in kuberay_docs() if doc.get("kind") == "ServiceAccount"}
    assert accounts, "no ServiceAccount in cluster/kuberay-*.yaml"
    for name, account in accounts.items():
        annotations = account["metadata"].get("annotations", {})
        assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} & set(annotations), \
            f"ServiceAccount {name} has no IRSA / workload-identity annotation"
    for path, doc in ray_docs():
        for group_name, group in groups(doc):
            pod = group["template"]["spec"]
            assert pod.get("serviceAccountName") in accounts, f"{path.name} {group_name}: no ngt-ray ServiceAccount"
            for container in pod["containers"]:
                assert not container.get("envFrom"), f"{path.name} {group_name}: envFrom may carry secrets"
    for path in [*KUBERAY_MANIFESTS, *RAY_UP_CONFIGS]:
        for text in (s for doc in load_yaml_docs(path) for s in strings(doc)):
            assert not _AWS_KEY_ID.search(text), f"{path.name}: an AWS access key id"
            assert not any(n in text for n in CREDENTIAL_NAMES), f"{path.name}: {text!r} names a credential"


def test_rayjob_entrypoint_is_the_cli() -> None:
    """The RayJob runs the installed `ngt-ray moderate` with flags the real parser takes, on S3."""
    from ngt_ray.cli import build_parser

    (job,) = [doc for _, doc in ray_docs() if doc["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["ngt-ray", "moderate"], argv
    args = build_parser().parse_args(argv[1:])
    assert args.input.startswith("s3://") and args.output.startswith("s3://")
    assert "runtimeEnvYAML" not in job["spec"] or "env_vars" not in job["spec"]["runtimeEnvYAML"], \
        "env_vars in a runtime env show in plain text in `ray job list`"
