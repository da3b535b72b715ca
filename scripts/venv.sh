# Sourced by the scripts: creates .venv (once) and installs this checkout into it, showing
# pip's progress as one short line per package (a first install takes 2-4 minutes:
# TensorFlow alone is about 600 MB); pip's whole output is shown only when it fails.
# The editable install puts the checkout on sys.path (setuptools' "compat" mode): with
# the default mode, a Python started in the clone's parent directory takes the clone
# itself (named ifa_tf) for the package, and its top-level serving/ for ifa_tf.serving.
install_venv() {
  local target=$1 log status
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  echo "      installing $target into .venv (first time: 2-4 minutes; later: seconds)"
  log=$(mktemp)
  set +e
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar=off \
      --config-settings editable_mode=compat -e "$target" 2>&1 \
    | tee "$log" \
    | grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed)' \
    | awk '{ print "      " substr($0, 1, 94); fflush() }'
  status=${PIPESTATUS[0]}
  set -e
  if [[ $status -ne 0 ]]; then
    cat "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
