# Sourced by the GPU scripts (benchmarks/gpu.sh, benchmarks/fidelity_gpu.sh), run from the
# repository root: installs the carried wheels (.whl/*.whl; the offline GPU machine lacks
# ml_collections and friends) into a temporary folder outside $OUT, and puts it and the
# checkout on PYTHONPATH.
site="$(mktemp -d)"  # outside $OUT: it does not come back
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install -q --no-index --no-deps --target "$site" .whl/*.whl
fi
export PYTHONPATH=".:$site" PYTHONUNBUFFERED=1
