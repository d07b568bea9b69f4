#!/usr/bin/env bash
# Debian packages the platform uses: R + mclust (the default clustering, through rpy2),
# Chromium (headless UI tests), Slurm + munge (the `executor: slurm` tests start a one-node
# cluster) and PostgreSQL (the Postgres-backed Dagster instance tests). Installed only when
# missing and apt is available; tests that need a missing one skip and say which.
set -euo pipefail

need=()
if ! Rscript -e 'suppressMessages(library(mclust))' >/dev/null 2>&1; then
  need+=(r-base-core r-cran-mclust)
fi
if [ ! -x /usr/bin/chromium ]; then
  need+=(chromium)
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
  need+=(slurm-wlm)
fi
if ! command -v munged >/dev/null 2>&1; then
  need+=(munge)
fi
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "WARNING: apt-get not available; install ${need[*]} yourself (R + mclust are needed for" \
       "the default clustering, chromium for the UI tests, slurm-wlm/munge/postgresql for the"\
       "cluster tests)." >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "WARNING: not root and no sudo; install ${need[*]} yourself." >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
# Only what is named: recommended packages (docs, X11 fonts, compilers R suggests) triple the install.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
