#!/usr/bin/env bash
# Run by Snakemake once, right after it creates the conda environment of envs/sd4match.yaml (`--sdm conda`),
# inside that environment. Snakemake runs a copy of this file (.snakemake/conda/<hash>.post-deploy.sh) from
# the working directory, so the checkout is located through SD4MATCH_SOURCE, which the Snakefile sets to its
# own folder. The dependencies come from the env file; only the package itself is installed here.
set -euo pipefail
source_dir="${SD4MATCH_SOURCE:?SD4MATCH_SOURCE is unset: run this through snakemake --sdm conda (the Snakefile sets it)}"
if [ ! -f "$source_dir/pyproject.toml" ]; then
  echo "sd4match post-deploy: no pyproject.toml in SD4MATCH_SOURCE=$source_dir" >&2
  exit 1
fi
python -m pip install --no-deps --no-build-isolation --editable "$source_dir"
