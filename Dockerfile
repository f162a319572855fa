# The image every node of an ngt-ray cluster runs (KubeRay head and workers, `ray up` nodes): the
# official Ray image at the project's pins plus this package, installed with pyproject.toml's pins and
# its packaged checkpoints. Nothing is installed on the nodes at boot.
#
# Build from the repository root (cluster/README.md: pushing, and the manifests that name this tag):
#   docker build -t ghcr.io/example-org/ngt-ray:0.1.0 .
# On Ray's CUDA 13.0 base instead (same tag if the cluster should run it):
#   docker build --build-arg RAY_VARIANT=cu130 -t ghcr.io/example-org/ngt-ray:0.1.0 .
#
# RAY_VERSION and PYTHON_TAG must equal pyproject.toml's `ray[...]==` pin and `requires-python`
# (tests/test_cluster_configs.py checks both); every other version comes from pyproject.toml.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
# cpu: Ubuntu base. The torch wheel pip installs brings its own CUDA runtime, cuDNN and nvJPEG
# (nvidia-* wheels), so this image also drives a GPU where the node's NVIDIA runtime exposes one.
# cu130: Ray's CUDA 13.0 base, matching the cu130 torch build this project is tested with.
ARG RAY_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}

ENV PYTHONUNBUFFERED=1
# The Ray image runs as user `ray` in /home/ray; the build folder is made by that user, so pip can
# write its build files there.
WORKDIR /home/ray
RUN mkdir ngt-ray

# Dependencies first, in a layer of their own (an empty package stands in for the code), so that a
# code change rebuilds in seconds instead of reinstalling torch. pyproject.toml pins every version.
COPY --chown=ray:users pyproject.toml README.md ngt-ray/
RUN mkdir ngt-ray/ngt_ray && touch ngt-ray/ngt_ray/__init__.py \
    && pip install --no-cache-dir ./ngt-ray \
    && rm -rf ngt-ray/ngt_ray ngt-ray/build ngt-ray/*.egg-info

# The package with its checkpoints (package-data: ngt_ray/checkpoints/*.pt, *.json). The source is
# removed once installed, so the checks below see the installed package, not the copied folder.
COPY --chown=ray:users ngt_ray ngt-ray/ngt_ray
RUN pip install --no-cache-dir --no-deps --force-reinstall ./ngt-ray \
    && rm -rf ngt-ray \
    && ngt-ray moderate --help > /dev/null \
    && python -c "import ngt_ray.nets.checkpoint as c; names = c.list_models(); \
assert names and all(c.get_model(n).with_suffix('.pt').is_file() for n in names), 'checkpoints missing'"
