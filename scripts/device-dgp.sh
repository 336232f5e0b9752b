#!/bin/bash
# Run cells of the deep-GP UCI study on a lent GPU machine, all splits of a method as one
# vmapped fit (`bayesgen bench-dgp --batch-splits`).
#
# The machine's image has JAX with CUDA (0.11 when last read) but an older numpyro and no
# blackjax, arviz or flowjax: `make device-wheels` downloads those (pure-Python wheels,
# about 8 MB) into .whl/, which the call carries. From the repository root, in one call:
#
#   run(command="bash scripts/device-dgp.sh concrete,energy 5", carry=[".whl"], timeout_s=600)
#
# Arguments: the datasets (comma-separated, as bench-dgp names them), the layers, and further
# `bench-dgp` options (e.g. --clip-norm 100, --split-ids 0-9). Rows go to $OUT/dgp/rows.jsonl
# as each method's batch of splits ends, so a call stopped at its limit returns what
# finished; to go on in a later call, put that file at outputs/device-resume/rows.jsonl and
# carry that folder too: it is copied into place and resumed from.
set -u
datasets=$1 layers=$2
shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-outputs/device}/dgp
mkdir -p "$out"
[ -f outputs/device-resume/rows.jsonl ] && cp outputs/device-resume/rows.jsonl "$out/rows.jsonl"
python3 -c 'import jax, numpyro; print("jax", jax.__version__, jax.devices(),
"numpyro", numpyro.__version__)' || exit 1
python3 -m bayesgen bench-dgp --datasets "$datasets" --layers "$layers" --steps 10000 \
    --methods dsvi,ddvi,dbvi --batch-splits --out "$out" --resume "$@"
