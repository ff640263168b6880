"""The Dockerfile agrees with pyproject.toml and the cluster manifests (it cannot be built here:
no docker): the Ray and Python of the base tag satisfy the project's requirements, the torch it
pins is the one pyproject allows, the project itself is installed from pyproject, and every
manifest names an image this Dockerfile builds, for the Ray version it is built on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
# {ray version}-py{major}{minor}-{cpu | cuXXX | gpu}
RAY_TAG = re.compile(
    r"(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<platform>cpu|cu\d+|gpu)"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def args(dockerfile) -> dict[str, str]:
    """The ARG defaults."""
    return dict(a.split("=", 1) for kind, a in dockerfile if kind == "ARG" and "=" in a)


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(project: dict, name: str) -> Requirement:
    (req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == name]
    return req


def test_base_image_is_rays_with_a_python_and_ray_the_project_accepts(dockerfile, args, project):
    froms = [a for kind, a in dockerfile if kind == "FROM"]
    assert froms == ["rayproject/ray:${RAY_TAG}"]
    tag = RAY_TAG.fullmatch(args["RAY_TAG"])
    assert tag, f"unexpected Ray image tag {args['RAY_TAG']}"
    assert tag["platform"] == "cpu"  # the default build is the CPU one
    assert requirement(project, "ray").specifier.contains(tag["ray"])
    python = f"{tag['py']}.{tag['minor']}"
    assert SpecifierSet(project["requires-python"]).contains(python)


def test_torch_is_the_pinned_cpu_build_before_the_project(dockerfile, args, project):
    assert requirement(project, "torch").specifier.contains(args["TORCH_VERSION"])
    assert args["TORCH_INDEX"] == "cpu"  # a -cpu base gets the CPU wheel
    runs = [a for kind, a in dockerfile if kind == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in runs[torch_run]
    project_run = next(i for i, r in enumerate(runs) if '".[${EXTRAS}]"' in r)
    assert torch_run < project_run  # so pip finds torch already there
    assert "-c /tmp/torch-constraint.txt" in runs[project_run]


def test_the_project_is_installed_from_its_pyproject(dockerfile, args, project):
    steps = [(kind, a) for kind, a in dockerfile if kind in ("COPY", "RUN", "WORKDIR")]
    copy = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and a.endswith(". ."))
    install = next(i for i, (k, a) in enumerate(steps) if '".[${EXTRAS}]"' in a)
    assert copy < install
    declared = set(project.get("optional-dependencies", {}))
    extras = set(args["EXTRAS"].split(","))
    assert extras == {"s3", "gcs"}
    if not extras & declared:
        pytest.skip(f"pyproject declares no {sorted(extras)} extras yet (the object-store work)")
    assert extras <= declared


def test_gpu_build_example_pairs_cuda_versions(args):
    """The header's GPU command: the Ray base's CUDA and the torch wheel index must match."""
    text = (REPO / "Dockerfile").read_text()
    (ray_tag,) = re.findall(r"--build-arg RAY_TAG=(\S+)", text)
    (index,) = re.findall(r"--build-arg TORCH_INDEX=(\S+)", text)
    tag = RAY_TAG.fullmatch(ray_tag)
    assert tag and tag["platform"] == index and index.startswith("cu")
    assert tag["ray"] == RAY_TAG.fullmatch(args["RAY_TAG"])["ray"]


# Other projects' images a manifest runs beside ours: mlflow-server.yaml's PostgreSQL.
THIRD_PARTY_IMAGES = {"postgres:16"}


def manifest_images() -> list[tuple[str, str, bool]]:
    """(file, image, asks for a GPU) for every container in cluster/*.yaml, and ray-up's
    head_image / worker_image."""
    found = []

    def walk(node, file):
        if isinstance(node, dict):
            if "image" in node and isinstance(node["image"], str):
                gpu = "nvidia.com/gpu" in str(node.get("resources", ""))
                found.append((file, node["image"], gpu))
            for key in ("head_image", "worker_image"):
                if key in node:
                    found.append((file, node[key], key == "worker_image"))
            for v in node.values():
                walk(v, file)
        elif isinstance(node, list):
            for v in node:
                walk(v, file)

    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            walk(doc, path.name)
    return found


def test_cluster_manifests_name_this_image_for_its_ray_version(args, project):
    images = manifest_images()
    files = {f for f, _, _ in images}
    assert {"kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-up-gpu.yaml"} <= files
    for file, image, gpu in images:
        if image in THIRD_PARTY_IMAGES:
            continue
        expected = f"ghcr.io/OWNER/context-encoders:{project['version']}-{'gpu' if gpu else 'cpu'}"
        assert image == expected, f"{file}: {image}"
    ray = RAY_TAG.fullmatch(args["RAY_TAG"])["ray"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        doc = next(yaml.safe_load_all((REPO / "cluster" / name).read_text()))
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray, name


def test_dockerignore_keeps_data_and_outputs_out() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "*.tar", "/outputs", "mlflow.db", "mlruns"} <= ignored
    assert not {"pyproject.toml", "README.md", "pipeline", "jobs"} & ignored
