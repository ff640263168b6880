# The image the cluster/ manifests run: Ray's official image + PyTorch + this project.
#
#   CPU (head node, MLflow server, CPU workers):
#     docker build -t ghcr.io/OWNER/context-encoders:0.1.0-cpu .
#   GPU workers (the base image's CUDA and the torch wheel's CUDA must match):
#     docker build --build-arg RAY_TAG=2.60.0-py311-cu128 --build-arg TORCH_INDEX=cu128 \
#       -t ghcr.io/OWNER/context-encoders:0.1.0-gpu .
#
# Ray's tags are {ray version}-py{python}-{cpu | cuXXX | gpu} (cluster/README.md). Keep the
# Ray version of RAY_TAG equal to the cluster's (KubeRay's rayVersion) and the Python of the
# tag equal to the client's: `ray job submit` and Ray Client need both to match.
ARG RAY_TAG=2.60.0-py311-cpu
FROM rayproject/ray:${RAY_TAG}

# torch first, from PyTorch's own index: `cpu` for a -cpu base, `cuXXX` for a -cuXXX base.
# Installed before the project so that pip finds the requirement met and never pulls the
# multi-GB default CUDA build into a CPU image.
ARG TORCH_INDEX=cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
      --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"

# Extras: s3:// and gs:// shard URLs, checkpoints and MLflow artifacts; `server`, the PostgreSQL
# driver cluster/mlflow-server.yaml's MLflow server needs (one image for every pod). A GPU
# tag (cuXXX / gpu) adds the `gpu` extra: nvidia-ml-py, which MLflow's system metrics need
# for the system/gpu_* metrics.
ARG EXTRAS=s3,gcs,server
# Re-declared: an ARG before FROM is not visible after it.
ARG RAY_TAG
# Jobs run from here, so relative paths in entrypoints (--config jobs/configs/...) resolve.
WORKDIR /home/ray/context-encoders

# Dependencies before the source: this layer depends on pyproject.toml alone, so a code edit
# rebuilds only the two cheap layers below it. The requirement list is read from pyproject
# (dependencies + the chosen extras), so the image never drifts from it; the constraint keeps
# the torch installed above (a local version such as 2.13.0+cpu matches ==2.13.0).
COPY --chown=ray:users pyproject.toml ./
RUN case "${RAY_TAG}" in *-cpu) extras="${EXTRAS}" ;; *) extras="${EXTRAS},gpu" ;; esac \
 && python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extra = p.get('optional-dependencies', {}); \
print('\n'.join(p['dependencies'] + [d for e in sys.argv[1].split(',') if e for d in extra[e]]))" \
      "${extras}" > /tmp/requirements.txt \
 && echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
 && pip install --no-cache-dir -c /tmp/torch-constraint.txt -r /tmp/requirements.txt

# The project itself, without dependencies (all installed above). The import check (run
# outside the source copy, so it imports the installed package) fails the build if anything
# swapped torch or the project does not import.
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --no-deps -e . \
 && cd /tmp && python -c "import torch, ray, pipeline, evaluation, jobs; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
print('torch', torch.__version__, 'ray', ray.__version__)"

# Progress lines reach `kubectl logs` / `ray job logs` as they are printed.
ENV PYTHONUNBUFFERED=1
