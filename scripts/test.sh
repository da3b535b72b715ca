#!/usr/bin/env bash
# Installs ifa_tf with its test and beam extras into .venv (without the beam extra, the
# tests of --runner, the converter and the state build on Apache Beam, skip and say why),
# then runs the tests in two passes: the suite on the TensorFlow backend, then the
# backend-independent layer tests (marker `jax`) again on JAX. Arguments go to the first pass; -k and -m filters go to both, e.g.
#   bash scripts/test.sh -k "readme or cli"      # a quick subset
# and each pass's summary is printed again at the end.
#
# The state store's tests run against a real redis-server. Where there is none, apt-get is
# at hand and this runs as root, it installs Debian's redis-server package, saying so first;
# INSTALL_REDIS=0 leaves it out (those tests then skip and say why).
# IFA_TF_TEST_DRY_RUN=1 prints the two pytest commands instead of installing and running.
set -euo pipefail
cd "$(dirname "$0")/.."

first=() keyword=() marker="" verbosity=()
while (($#)); do
  case $1 in
    -k|-m)
      [[ $# -ge 2 ]] || { echo "scripts/test.sh: $1 needs an expression" >&2; exit 2; }
      if [[ $1 == -k ]]; then keyword=(-k "$2"); else marker=$2; fi
      first+=("$1" "$2"); shift 2;;
    -k?*) keyword=(-k "${1#-k}"); first+=("$1"); shift;;
    -m?*) marker=${1#-m}; first+=("$1"); shift;;
    -q|-qq|-v|-vv|--quiet|--verbose) verbosity+=("$1"); shift;;
    *) first+=("$1"); shift;;
  esac
done
# -q by default; the caller's own instead (a second -q would hide the summary line).
((${#verbosity[@]})) || verbosity=(-q)
# A -m replaces setup.cfg's "not slow" in the first pass; the JAX pass keeps its own marker.
jax_marker=${marker:+jax and ($marker)}
tf_pass=(.venv/bin/python -m pytest "${verbosity[@]}" "${first[@]}")
jax_pass=(.venv/bin/python -m pytest "${verbosity[@]}" -m "${jax_marker:-jax and not slow}"
          "${keyword[@]}" tests)

if [[ ${IFA_TF_TEST_DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${tf_pass[@]}"; echo
  printf 'KERAS_BACKEND=jax JAX_ENABLE_X64=1 '; printf '%q ' "${jax_pass[@]}"; echo
  exit 0
fi

source scripts/venv.sh
install_venv ".[test,beam]"
if [[ ${INSTALL_REDIS:-1} != 0 ]] && ! command -v redis-server >/dev/null \
    && command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
  echo "      installing redis-server with apt-get for the state store tests" \
       "(INSTALL_REDIS=0 skips it)"
  { apt-get update -qq && apt-get install -y -qq redis-server; } >/dev/null 2>&1 \
    || echo "      could not install redis-server: its tests will skip"
fi
export TF_CPP_MIN_LOG_LEVEL=2
export IFA_TF_INSTALLED_BY_SCRIPTS=1  # tests/test_scripts.py: the install is venv.sh's

# Runs one pass, its output shown and kept; sets `summary` (pytest's last line) and
# `status` (0 also when the filters leave the pass no test: pytest's 5).
run_pass() {
  local log
  log=$(mktemp)
  set +e
  "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  summary=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$log" \
            | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
  rm -f "$log"
  [[ $status -eq 5 ]] && status=0
  return 0
}

echo "== 1/2: the test suite on TensorFlow"
run_pass "${tf_pass[@]}"
tf_status=$status tf_summary=${summary:-no summary}
echo "== 2/2: the layer tests on JAX"
# int64 ids need JAX's 64-bit mode: without it JAX truncates them to int32.
run_pass env KERAS_BACKEND=jax JAX_ENABLE_X64=1 "${jax_pass[@]}"
jax_status=$status jax_summary=${summary:-no summary}
echo "TensorFlow: $tf_summary"
echo "JAX:        $jax_summary"
((tf_status == 0 && jax_status == 0))
