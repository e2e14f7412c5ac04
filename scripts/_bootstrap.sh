# Sourced by scripts/demo and scripts/test: make .venv with keyguard installed
# (editable) and the extras named in $KEYGUARD_EXTRAS, reinstalling only when
# pyproject.toml changed. Needs nothing but Python 3.10+ on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $PYTHON" >&2
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.keyguard-installed-${KEYGUARD_EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "==> installing keyguard[${KEYGUARD_EXTRAS}] into .venv" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip >&2
    .venv/bin/python -m pip install --quiet -e ".[${KEYGUARD_EXTRAS}]" >&2
    touch "$stamp"
fi
