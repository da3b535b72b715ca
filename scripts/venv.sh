# Sourced by the scripts: creates .venv (once) and installs this checkout into it.
install_venv() {
  local target=$1 log
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
