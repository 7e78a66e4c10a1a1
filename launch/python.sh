# Sourced by the launch scripts: cd to the repository and pick its Python, so nothing needs activating.
# PY: the project's .venv when it exists, else `python` from PATH (e.g. after `pip install -e .`).
cd "${REPO:-$(dirname "${BASH_SOURCE[0]}")/..}"
if [ -x .venv/bin/python ]; then PY=$(pwd)/.venv/bin/python; else PY=${PYTHON:-python}; fi
export PY
