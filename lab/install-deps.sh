#!/bin/sh
# Install what the mail lab needs on a fresh Debian 12 machine (root),
# WITHOUT starting the system Dovecot/Postfix services: a temporary
# /usr/sbin/policy-rc.d answering 101 makes invoke-rc.d skip every start
# during the install, and Postfix is installed with "No configuration".
# The lab never uses the system instances; it starts its own (lab/README.md).
#
#   sh lab/install-deps.sh            # install what is missing
#   sh lab/install-deps.sh --check    # only report (exit 1 if something is missing)
set -eu

pkgs="dovecot-imapd dovecot-lmtpd postfix openssl iptables procps"
missing=""
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "maillab: all packages present ($pkgs)"
    exit 0
fi
echo "maillab: missing:$missing"
[ "${1:-}" = "--check" ] && exit 1

created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() { [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d; return 0; }
trap cleanup EXIT

echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
