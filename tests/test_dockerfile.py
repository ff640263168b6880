"""The Dockerfile agrees with pyproject.toml and the cluster manifests (it cannot be built here:
no docker): the Ray and Python of the base tag satisfy the project's requirements, the torch it
pins is the one pyproject allows, the project itself is installed from pyproject, and every
manifest names an image this Dockerfile builds, for the Ray version it is built on."""

from __future__ import annotations

import re
import subprocess
import sys
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
    assert int(tag["minor"]) >= 11  # the dependency layer reads pyproject with tomllib


def test_torch_is_the_pinned_cpu_build_before_the_project(dockerfile, args, project):
    assert requirement(project, "torch").specifier.contains(args["TORCH_VERSION"])
    assert args["TORCH_INDEX"] == "cpu"  # a -cpu base gets the CPU wheel
    runs = [a for kind, a in dockerfile if kind == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert "download.pytorch.org/whl/${TORCH_INDEX}" in runs[torch_run]
    deps_run = next(i for i, r in enumerate(runs) if "-r /tmp/requirements.txt" in r)
    assert torch_run < deps_run  # so pip finds torch already there
    assert "-c /tmp/torch-constraint.txt" in runs[deps_run]


def requirements_script(dockerfile) -> str:
    """The `python -c` program of the dependency layer that lists pyproject's requirements."""
    run = next(a for kind, a in dockerfile if kind == "RUN" and "/tmp/requirements.txt" in a)
    return re.search(r'python -c "(.+?)" +"\$\{extras\}"', run)[1]


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile):
    """A code edit must not reinstall every dependency: the dependency layer sees only
    pyproject.toml; the source arrives after it and is installed without dependencies."""
    steps = [(kind, a) for kind, a in dockerfile if kind in ("COPY", "RUN")]
    find = lambda pred: next(i for i, (k, a) in enumerate(steps) if pred(k, a))  # noqa: E731
    copy_pyproject = find(lambda k, a: k == "COPY" and a.split()[-2:] == ["pyproject.toml", "./"])
    deps = find(lambda k, a: k == "RUN" and "-r /tmp/requirements.txt" in a)
    copy_source = find(lambda k, a: k == "COPY" and a.endswith(". ."))
    project = find(lambda k, a: k == "RUN" and "pip install --no-cache-dir --no-deps -e ." in a)
    assert copy_pyproject < deps < copy_source < project
    assert not any(k == "COPY" for k, _ in steps[copy_pyproject + 1 : deps])


@pytest.mark.parametrize("extras", ["s3,gcs,server", "s3,gcs,server,gpu"])
def test_the_dependency_layer_installs_pyprojects_requirements(dockerfile, project, extras):
    """The Dockerfile's own program, run on this pyproject: every dependency and every
    requirement of the chosen extras, nothing else."""
    out = subprocess.run([sys.executable, "-c", requirements_script(dockerfile), extras],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout  # fmt: skip
    optional = project["optional-dependencies"]
    expected = project["dependencies"] + [d for e in extras.split(",") for d in optional[e]]
    assert out.splitlines() == expected


def test_gpu_tags_get_the_gpu_extra_with_nvml(dockerfile, args, project):
    """MLflow's system/gpu_* metrics need pynvml (nvidia-ml-py): a GPU image installs it."""
    assert set(args["EXTRAS"].split(",")) == {"s3", "gcs", "server"}
    assert {"s3", "gcs", "gpu"} <= set(project["optional-dependencies"])
    assert any(
        Requirement(r).name == "nvidia-ml-py" for r in project["optional-dependencies"]["gpu"]
    )
    run = next(a for kind, a in dockerfile if kind == "RUN" and "/tmp/requirements.txt" in a)
    case = re.search(r"case (.+?) esac", run)[0]
    default = args["EXTRAS"]
    for tag, expected in [("2.60.0-py311-cpu", default), ("2.60.0-py311-cu128", f"{default},gpu"),
                          ("2.60.0-py311-gpu", f"{default},gpu")]:  # fmt: skip
        script = f'RAY_TAG={tag}; EXTRAS={default}; {case}; echo "$extras"'
        got = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
        assert got.stdout.strip() == expected, tag


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


def test_rayjob_entrypoint_is_a_valid_paper128_run(capsys):
    """The RayJob's command, as its submitter runs it: the shipped config by name, overrides
    that exist and type-check (--print-config stops before shards or Ray are needed), and a
    retry policy so that a failed run is resumed on a new cluster."""
    import shlex

    from jobs.pretrain import main

    doc = next(yaml.safe_load_all((REPO / "cluster" / "kuberay-rayjob.yaml").read_text()))
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "jobs.pretrain", "--config", "paper128"]
    assert main([*argv[3:], "--print-config"]) is None
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["image_size"] == 128 and cfg["run"]["num_workers"] == 4
    assert cfg["run"]["run_name"] == "paper128-centre"  # a fixed name: a rerun resumes it
    assert doc["spec"]["backoffLimit"] >= 1
