#!/usr/bin/env bash
# Optional system packages for the tests that need them: SLURM and munge (tests/test_slurm.py
# starts a 2-node cluster on loopback) and shellcheck (lints the job scripts). Debian/Ubuntu,
# as root or with sudo. Without them those tests skip and say so; CI installs them with this.
set -euo pipefail
PACKAGES=(slurm-wlm munge shellcheck)
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/munged ] \
   && command -v shellcheck >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "setup_system.sh: no apt-get here; install ${PACKAGES[*]} with this system's package manager" >&2
  exit 2
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup_system.sh: run as root, or install sudo" >&2; exit 2; }
  SUDO=sudo
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
