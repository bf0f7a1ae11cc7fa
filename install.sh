#!/usr/bin/env bash
# Production install of nat64ho from this checkout: the nat64ho user, a venv in
# its home, the systemd unit, the settings file, logrotate; also upgrade,
# uninstall and purge. `./install.sh --help` says what goes where.
set -euo pipefail

readonly NAME=nat64ho
readonly HOME_DIR=/home/nat64ho
# The unit hard-codes these paths (they must match its ReadWritePaths).
readonly VENV=$HOME_DIR/venv
readonly DATA_DIR=$HOME_DIR/data
readonly LOG_DIR=$HOME_DIR/logs
readonly BIN_DIR=$HOME_DIR/bin
readonly INSTALL_CONF=$HOME_DIR/install.conf
readonly SETTINGS=/etc/default/nat64ho
readonly UNIT=/etc/systemd/system/nat64ho.service
readonly DROPIN_DIR=/etc/systemd/system/nat64ho.service.d
readonly LOGROTATE=/etc/logrotate.d/nat64ho
readonly SYSCTL=/etc/sysctl.d/60-nat64ho.conf
readonly WANTS_DIR=/etc/systemd/system/multi-user.target.wants
readonly WRAPPER=/usr/local/bin/nat64ho
readonly DEFAULT_LISTEN=0.0.0.0:6464
readonly DEFAULT_METRICS=127.0.0.1:9464
# The attribution API's socket (--api): in the unit's RuntimeDirectory.
readonly API_SOCKET=/run/nat64ho/api.sock
# Days of rotated event logs kept: long enough to answer abuse reports.
readonly DEFAULT_LOG_KEEP=180

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
readonly SRC

usage() {
    cat <<EOF
Usage: sudo ./install.sh [OPTIONS]
       sudo ./install.sh --uninstall | --purge [--yes]

Installs nat64ho from this checkout ($SRC) as a hardened systemd
service, or upgrades an existing install in place. Run it again after pulling
new code: the database, the event log and the settings are kept.

What goes where:
  user and group nat64ho (system account, no login shell)
  $HOME_DIR/               home, owned by root (the service cannot change its code)
  $VENV            link to the current release: a virtual environment with
                             nat64ho (and uvloop) in $HOME_DIR/releases/
  $HOME_DIR/wheels/, requirements.txt   pinned dependencies (sha256)
  $DATA_DIR/nat64ho.db  the database (kept on upgrade and uninstall)
  $LOG_DIR/nat64ho.log  the event log (kept on upgrade and uninstall)
  $BIN_DIR/nat64ho-update   the --auto-update helper
  $INSTALL_CONF   what this script chose (source, Python, options)
  $SETTINGS      settings: listen address, allowed NAT64 prefixes,
                             metrics address, other 'nat64ho serve' options.
                             Written once, then never overwritten.
  $UNIT   the unit (contrib/nat64ho.service)
  $DROPIN_DIR/auto-update.conf   only with --auto-update
  $LOGROTATE   daily rotation (contrib/logrotate/nat64ho)
  $SYSCTL   net.core.rmem_max for the 4 MiB UDP receive buffer
                             (contrib/sysctl), only where the host allowed less
  $WRAPPER     nat64ho for operators (root, group nat64ho), with
                             the installed database as its default --db

Options:
  --listen ADDR:PORT   set NAT64HO_LISTEN in the settings (default $DEFAULT_LISTEN)
  --metrics ADDR:PORT  set NAT64HO_METRICS, the Prometheus endpoint
                       (default $DEFAULT_METRICS; '' turns it off)
  --api                set NAT64HO_API=unix:$API_SOCKET: the read-only
                       attribution API (docs/api.md), a Unix socket 0660 of
                       group nat64ho; add nginx's user to that group to let
                       it ask. Off by default; --no-api turns it off again
  --log-keep DAYS      rotated event logs to keep (default $DEFAULT_LOG_KEEP, or as
                       chosen last time)
  --python PATH        the Python to build the venv from (3.11 or newer;
                       default: the first of python3, python3.13, python3.12,
                       python3.11 that is new enough)
  --auto-update        on every start of the service, update this checkout
                       (git pull --ff-only, as the checkout's owner) and
                       build it as user nat64ho with the pinned dependencies;
                       a checkout with uncommitted changes or commits its
                       upstream lacks is refused, and on any failure the
                       service starts with the code it has. Off by default:
                       it runs whatever the upstream branch holds.
                       Remembered until --no-auto-update.
  --no-auto-update     turn --auto-update off again
  --uninstall          stop and remove the service and the code; keep the
                       database, the logs, the settings and the user
  --purge              --uninstall, then also remove the user, $HOME_DIR
                       (database and logs) and the settings, after listing them
                       and asking (--yes: do not ask; required without a terminal)
  --root DIR           lay the same files out under DIR instead of /, for tests
                       and images: no systemctl, no useradd; the user is
                       recorded as lines in DIR/etc/passwd and DIR/etc/group
                       (and shadow files when DIR has them) with ids free
                       there; files are chowned to it only when run as root;
                       the unit is enabled by its multi-user.target.wants
                       link. The venv names the paths it has once DIR is /
                       (the Python used must exist at the same path in DIR).
  -h, --help           this text

Before changing anything it checks: root (except with --root), systemd
running (except with --root), Python 3.11 or newer with venv that other
users may run, the listen and metrics ports free (unless nat64ho itself
holds them; not with --root: an image runs elsewhere), and for
--auto-update a git checkout with an upstream branch. The service user
builds the release; when it cannot enter DIR (under a private directory,
as mktemp -d makes) it builds in /var/tmp and the result is moved in.
Before changing anything that runs, the new nat64ho checks the settings
(serve --check-config).

After installing:
  systemctl status nat64ho              is it running
  journalctl -u nat64ho                 its messages (start, stop, errors)
  $LOG_DIR/nat64ho.log     the event log (Created/Deleted/Initialized)
  nat64ho who ADDR:PORT                  who held a NAT port (also: query, stats, export)
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ options

ROOT=
ACTION=install
LISTEN=
METRICS=
METRICS_SET=
API_SET=
LOG_KEEP=
PYTHON=
AUTO_UPDATE=
YES=

need_arg() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --root) need_arg "$@"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#*=} ;;
        --listen) need_arg "$@"; LISTEN=$2; shift ;;
        --listen=*) LISTEN=${1#*=} ;;
        --metrics) need_arg "$@"; METRICS=$2; METRICS_SET=1; shift ;;
        --metrics=*) METRICS=${1#*=}; METRICS_SET=1 ;;
        --api) API_SET=unix:$API_SOCKET ;;
        --no-api) API_SET=off ;;
        --log-keep) need_arg "$@"; LOG_KEEP=$2; shift ;;
        --log-keep=*) LOG_KEEP=${1#*=} ;;
        --python) need_arg "$@"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --auto-update) AUTO_UPDATE=yes ;;
        --no-auto-update) AUTO_UPDATE=no ;;
        --uninstall) ACTION=uninstall ;;
        --purge) ACTION=purge ;;
        --yes|-y) YES=1 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

# LAYOUT: --root was given (even --root /, e.g. inside a chroot): files
# only, no systemctl, no useradd.
LAYOUT=
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd -P)
    LAYOUT=1
fi
# Every path written goes through R, so --root changes where, never what.
R=${ROOT%/}

if [ -n "$LOG_KEEP" ] && ! [[ $LOG_KEEP =~ ^[0-9]+$ ]]; then
    die "--log-keep '$LOG_KEEP': expected a number of days"
fi

# ------------------------------------------------------------------ helpers

# The value of KEY in a KEY=VALUE file (systemd EnvironmentFile syntax, quotes
# stripped), without sourcing it.
read_var() {
    local file=$1 key=$2 line
    [ -f "$file" ] || return 0
    line=$(sed -n "s/^[[:space:]]*$key=//p" "$file" | tail -n 1)
    line=${line%\"}; line=${line#\"}; line=${line%\'}; line=${line#\'}
    printf '%s' "$line"
}

# Replace KEY's line in FILE (or append it): the one edit we make to files the
# operator owns, and only when asked to on the command line.
set_var() {
    local file=$1 key=$2 value=$3 tmp
    tmp=$(mktemp "$file.XXXXXX")
    grep -v "^[[:space:]]*$key=" "$file" >"$tmp" || true
    printf '%s=%s\n' "$key" "$value" >>"$tmp"
    chmod --reference="$file" "$tmp"
    mv -f "$tmp" "$file"
}

service_active() {
    [ -z "$LAYOUT" ] && command -v systemctl >/dev/null && systemctl is-active --quiet "$NAME.service"
}

# Exit status 0 if PY is Python >= 3.11 that can make a venv with pip.
python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?"
}

PY=
find_python() {
    local candidates=() c path seen=()
    if [ -n "$PYTHON" ]; then candidates=("$PYTHON"); else
        candidates=(python3 python3.13 python3.12 python3.11 /usr/bin/python3)
    fi
    for c in "${candidates[@]}"; do
        path=$(command -v "$c" 2>/dev/null) || continue
        if python_ok "$path"; then
            # The interpreter itself, not a shim (pyenv): the venv links to it.
            path=$("$path" -c 'import sys; print(sys.executable)')
            # The service user runs it (and builds with it): one under
            # /root, say, cannot serve.
            # (Through env: setpriv itself execs with root's capabilities.)
            if [ "$(id -u)" = 0 ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups \
                    env "$path" -c pass 2>/dev/null; then
                seen+=("$c (at $path, which other users cannot run)")
                continue
            fi
            PY=$path
            return 0
        fi
        seen+=("$c $(python_version "$path")")
    done
    if [ ${#seen[@]} -eq 0 ]; then
        problems+=("no Python found (${candidates[*]}): nat64ho needs Python 3.11 or newer with venv; on Debian: apt-get install python3 python3-venv")
        return 0
    fi
    local first=${seen[0]} v
    v=${first##* }
    if [ "$v" != "?" ] && [ "$(printf '%s\n3.11\n' "$v" | sort -V | head -n 1)" = 3.11 ]; then
        problems+=("${first% *} is Python $v but cannot create a virtual environment (no venv/ensurepip): apt-get install python3-venv (or python$v-venv)")
    else
        problems+=("nat64ho needs Python 3.11 or newer; found: ${seen[*]}. On Ubuntu 22.04: apt-get install python3.11 python3.11-venv")
    fi
}

# Fails (adds a problem) if PROTO (udp/tcp) ADDR:PORT cannot be bound now.
check_port() {
    local what=$1 proto=$2 addr=$3 out
    [ -n "$addr" ] || return 0
    out=$("$PY" - "$proto" "$addr" <<'EOF' 2>&1
import socket, sys
proto, text = sys.argv[1], sys.argv[2]
host, sep, port = text.rpartition(":")
host = host.strip("[]")
if not sep or not port.isdigit() or not host:
    sys.exit(f"'{text}' is not ADDR:PORT")
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
with socket.socket(family, kind) as s:
    if kind == socket.SOCK_STREAM:
        # As a server would: a port in TIME_WAIT is still usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError as exc:
        sys.exit(f"cannot bind {proto.upper()} {text}: {exc.strerror} (stop what holds it, "
                 "or choose another with --listen or --metrics)")
EOF
    ) || problems+=("$what: $out")
}

# Run a command as the owner of the checkout: git and builds from a checkout
# someone else owns should not run as root.
SRC_OWNER=
as_owner() {
    if [ "$SRC_OWNER" = "$(id -un)" ]; then "$@"; else
        runuser -u "$SRC_OWNER" -- env HOME="$(getent passwd "$SRC_OWNER" | cut -d: -f6)" "$@"
    fi
}

# ------------------------------------------------------------------ checks
# All of them run before anything is changed, and all failures are listed.

problems=()

check_install() {
    if [ -z "$LAYOUT" ]; then
        [ "$(id -u)" = 0 ] || problems+=("must run as root (sudo ./install.sh), or use --root DIR")
        if [ ! -d /run/systemd/system ]; then
            problems+=("systemd is not running on this host (no /run/systemd/system); use --root DIR to only lay the files out")
        fi
        if ! command -v useradd >/dev/null; then problems+=("useradd not found (package passwd)"); fi
        if ! command -v runuser >/dev/null; then problems+=("runuser not found (package util-linux)"); fi
        # The unit's ExecReload (SIGHUP to reopen the log); minimal systems lack it.
        if [ ! -x /bin/kill ]; then problems+=("/bin/kill not found: apt-get install procps"); fi
    fi
    [ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/contrib/nat64ho.service" ] \
        || problems+=("$SRC does not look like a nat64ho checkout (no pyproject.toml or contrib/nat64ho.service)")
    find_python

    local listen metrics
    listen=${LISTEN:-$(read_var "$R$SETTINGS" NAT64HO_LISTEN)}
    listen=${listen:-$DEFAULT_LISTEN}
    if [ -n "$METRICS_SET" ]; then metrics=$METRICS
    elif [ -f "$R$SETTINGS" ]; then metrics=$(read_var "$R$SETTINGS" NAT64HO_METRICS)
    else metrics=$DEFAULT_METRICS; fi
    # On an upgrade the running service holds its own ports: that is fine.
    # An image (--root) runs elsewhere: this host's ports say nothing of it.
    if [ -n "$PY" ] && [ -z "$LAYOUT" ] && ! service_active; then
        check_port "listen address" udp "$listen"
        check_port "metrics address" tcp "$metrics"
    fi

    local want_auto=$AUTO_UPDATE
    [ -n "$want_auto" ] || want_auto=$(read_var "$R$INSTALL_CONF" AUTO_UPDATE)
    if [ "$want_auto" = yes ]; then
        if ! command -v git >/dev/null; then
            problems+=("--auto-update needs git (apt-get install git)")
        elif ! git -c safe.directory="$SRC" -C "$SRC" rev-parse --abbrev-ref '@{upstream}' >/dev/null 2>&1; then
            problems+=("--auto-update needs $SRC to be a git checkout on a branch with an upstream (git branch --set-upstream-to)")
        fi
    fi

    if [ ${#problems[@]} -gt 0 ]; then
        printf 'install.sh: cannot install, nothing was changed:\n' >&2
        printf '  - %s\n' "${problems[@]}" >&2
        exit 1
    fi
}

check_remove() {
    if [ -z "$LAYOUT" ] && [ "$(id -u)" != 0 ]; then
        die "must run as root (sudo ./install.sh $1), or use --root DIR; nothing was changed"
    fi
}

# ------------------------------------------------------------------ the user

# Echoes "uid gid" of nat64ho, creating the account if it is missing.
ensure_user() {
    if [ -z "$LAYOUT" ]; then
        if ! getent passwd "$NAME" >/dev/null; then
            useradd --system --user-group --home-dir "$HOME_DIR" --no-create-home \
                --shell /usr/sbin/nologin --comment "NAT64 handoff server" "$NAME"
        fi
        printf '%s %s\n' "$(id -u "$NAME")" "$(id -g "$NAME")"
        return
    fi
    mkdir -p "$R/etc"
    touch "$R/etc/passwd" "$R/etc/group"
    local line id
    line=$(grep "^$NAME:" "$R/etc/passwd" || true)
    if [ -z "$line" ]; then
        # Ids come from the tree's own files, never the host's: the group if
        # the tree has it, else the highest system id (999 down, as useradd
        # --system picks) free as both uid and gid.
        local gid uid
        gid=$(sed -n "s/^$NAME:[^:]*:\([0-9]*\):.*/\1/p" "$R/etc/group" | head -n 1)
        for id in ${gid:-} $(seq 999 -1 100); do
            cut -d: -f3 "$R/etc/passwd" | grep -qx "$id" && continue
            if [ -z "$gid" ]; then cut -d: -f3 "$R/etc/group" | grep -qx "$id" && continue; fi
            uid=$id
            break
        done
        [ -n "${uid:-}" ] || die "no free system id (100-999) in $R/etc/passwd"
        if [ -z "$gid" ]; then
            gid=$uid
            printf '%s:x:%s:\n' "$NAME" "$gid" >>"$R/etc/group"
        fi
        printf '%s:x:%s:%s:NAT64 handoff server:%s:/usr/sbin/nologin\n' \
            "$NAME" "$uid" "$gid" "$HOME_DIR" >>"$R/etc/passwd"
        if [ -f "$R/etc/shadow" ]; then printf '%s:!*:%s::::::\n' "$NAME" "$(( $(date +%s) / 86400 ))" >>"$R/etc/shadow"; fi
        if [ -f "$R/etc/gshadow" ] && ! grep -q "^$NAME:" "$R/etc/gshadow"; then printf '%s:!::\n' "$NAME" >>"$R/etc/gshadow"; fi
        line=$(grep "^$NAME:" "$R/etc/passwd")
    fi
    printf '%s %s\n' "$(cut -d: -f3 <<<"$line")" "$(cut -d: -f4 <<<"$line")"
}

remove_user() {
    if [ -z "$LAYOUT" ]; then
        if getent passwd "$NAME" >/dev/null; then userdel "$NAME"; fi
        if getent group "$NAME" >/dev/null; then groupdel "$NAME"; fi
        return
    fi
    local f
    for f in passwd group shadow gshadow; do
        if [ -f "$R/etc/$f" ]; then sed -i "/^$NAME:/d" "$R/etc/$f"; fi
    done
}

# chown that only acts when we can (as root); --root as a user still lays out.
own() {
    if [ "$(id -u)" = 0 ]; then chown "$@"; fi
}

# ------------------------------------------------------------------ install

do_install() {
    check_install
    local ids uid gid auto keep candidate had_settings
    auto=${AUTO_UPDATE:-$(read_var "$R$INSTALL_CONF" AUTO_UPDATE)}
    auto=${auto:-no}
    keep=${LOG_KEEP:-$(read_var "$R$INSTALL_CONF" LOG_KEEP)}
    keep=${keep:-$DEFAULT_LOG_KEEP}
    SRC_OWNER=$(stat -c %U "$SRC")

    say "Installing nat64ho from $SRC${LAYOUT:+ into $ROOT} with $PY ($(python_version "$PY"))"
    if [ -n "$R" ] && [ ! -x "$R$(readlink -f "$PY")" ]; then
        warn "$ROOT has no $(readlink -f "$PY"): the venv will only run there once it has that Python"
    fi
    ids=$(ensure_user)
    read -r uid gid <<<"$ids"

    # Code and its home belong to root: a compromised daemon cannot rewrite
    # what runs it. Group nat64ho may read the data and logs (operator
    # commands); others may not.
    install -d -m 0755 "$R$HOME_DIR"
    own "0:$gid" "$R$HOME_DIR"
    install -d -m 0755 "$R$BIN_DIR"
    own 0:0 "$R$BIN_DIR"
    install -d -m 0750 "$R$DATA_DIR" "$R$LOG_DIR"
    own "$uid:$gid" "$R$DATA_DIR" "$R$LOG_DIR"

    install -m 0755 "$SRC/contrib/nat64ho-update" "$R$BIN_DIR/nat64ho-update"
    own 0:0 "$R$BIN_DIR/nat64ho-update"
    write_install_conf "$auto" "$keep"
    pin_dependencies

    # The settings as they will be, checked by the new release itself before
    # anything that runs is changed.
    candidate=$(mktemp)
    had_settings=
    if [ -f "$R$SETTINGS" ]; then had_settings=1; fi
    make_settings "$candidate"
    say "Building and checking nat64ho as user $NAME in $R$HOME_DIR/releases"
    if ! NAT64HO_QUIET=1 "$R$BIN_DIR/nat64ho-update" --install ${R:+--root "$R"} \
            --settings "$candidate" "$R$HOME_DIR"; then
        rm -f "$candidate"
        die "nothing that runs was changed (settings, unit and venv are as they were)"
    fi
    install -d -m 0755 "$(dirname "$R$SETTINGS")"
    if [ -z "$had_settings" ]; then
        install -m 0644 "$candidate" "$R$SETTINGS"
        say "Wrote the settings $R$SETTINGS"
    else
        say "Keeping the settings $R$SETTINGS"
        if [ -n "$LISTEN" ] || [ -n "$METRICS_SET" ] || [ -n "$API_SET" ]; then
            chmod --reference="$R$SETTINGS" "$candidate"
            mv -f "$candidate" "$R$SETTINGS"
        fi
    fi
    rm -f "$candidate"

    install -d -m 0755 "$R/etc/systemd/system"
    install -m 0644 "$SRC/contrib/nat64ho.service" "$R$UNIT"
    if [ "$auto" = yes ]; then
        install -d -m 0755 "$R$DROPIN_DIR"
        write_dropin >"$R$DROPIN_DIR/auto-update.conf"
        chmod 0644 "$R$DROPIN_DIR/auto-update.conf"
    else
        rm -f "$R$DROPIN_DIR/auto-update.conf"
        rmdir "$R$DROPIN_DIR" 2>/dev/null || true
    fi
    install -d -m 0755 "$R/etc/logrotate.d"
    sed "s/^\([[:space:]]*rotate\) [0-9]*/\1 $keep/" "$SRC/contrib/logrotate/nat64ho" >"$R$LOGROTATE"
    chmod 0644 "$R$LOGROTATE"
    if [ -z "$LAYOUT" ] && ! command -v logrotate >/dev/null; then
        warn "logrotate is not installed: the event log will grow until you install it (apt-get install logrotate)"
    fi
    install_sysctl
    install_wrapper

    if [ -n "$LAYOUT" ]; then
        # What `systemctl enable` would do, so the tree starts it at boot.
        install -d -m 0755 "$R$WANTS_DIR"
        ln -sfn "$UNIT" "$R$WANTS_DIR/$NAME.service"
        say "Laid out under $ROOT (enabled, not started: --root)."
        return
    fi
    systemctl daemon-reload
    systemctl enable --quiet "$NAME.service"
    # restart: starts a new install, and makes an upgrade run the new code.
    if ! systemctl restart "$NAME.service"; then
        journalctl -u "$NAME.service" -n 30 --no-pager >&2 || true
        die "nat64ho.service did not start; see above, fix $SETTINGS, then: systemctl restart nat64ho"
    fi
    print_howto
}

# Downloads (as the checkout's owner) the wheels of nat64ho's dependencies and
# of its build backend, and pins each by sha256: nat64ho-update installs only
# these, offline.
pin_dependencies() {
    local tmp f name rest
    say "Pinning the dependencies in $R$HOME_DIR/requirements.txt"
    tmp=$(mktemp -d)
    own "$SRC_OWNER" "$tmp"
    if ! as_owner "$PY" -m venv "$tmp/venv" \
            || ! as_owner "$tmp/venv/bin/python" -m pip download --quiet --disable-pip-version-check \
                --only-binary=:all: -d "$tmp/wheels" "$SRC" hatchling; then
        rm -rf "$tmp"
        die "downloading the dependencies failed; nothing that runs was changed"
    fi
    rm -f "$tmp"/wheels/nat64ho-*
    {
        say "# Written by install.sh: the only packages nat64ho-update installs (from"
        say "# $HOME_DIR/wheels, no index), each checked against its sha256."
        for f in "$tmp"/wheels/*.whl; do
            name=${f##*/}; rest=${name#*-}
            printf '%s==%s --hash=sha256:%s\n' "${name%%-*}" "${rest%%-*}" "$(sha256sum "$f" | cut -d' ' -f1)"
        done
    } >"$tmp/requirements.txt"
    rm -rf "$R$HOME_DIR/wheels.new"
    install -d -m 0755 "$R$HOME_DIR/wheels.new"
    install -m 0644 "$tmp"/wheels/*.whl "$R$HOME_DIR/wheels.new/"
    own -R 0:0 "$R$HOME_DIR/wheels.new"
    rm -rf "$R$HOME_DIR/wheels"
    mv -T "$R$HOME_DIR/wheels.new" "$R$HOME_DIR/wheels"
    install -m 0644 "$tmp/requirements.txt" "$R$HOME_DIR/requirements.txt"
    own 0:0 "$R$HOME_DIR/requirements.txt"
    rm -rf "$tmp"
}

# The receive buffer the server asks for, where the host allows less: the
# file sets it at boot and is applied now. A host that already allows as
# much is left alone (the file could lower a later, larger setting). --root
# cannot know the tree's kernel: it gets the file.
install_sysctl() {
    local wanted current=0
    wanted=$(sed -n 's/^net\.core\.rmem_max *= *\([0-9]*\)$/\1/p' "$SRC/contrib/sysctl/60-nat64ho.conf")
    if [ -z "$LAYOUT" ]; then
        current=$(cat /proc/sys/net/core/rmem_max 2>/dev/null || echo 0)
        if [ "$current" -ge "$wanted" ] && [ ! -f "$R$SYSCTL" ]; then
            say "Keeping net.core.rmem_max $current (nat64ho asks for $wanted)"
            return
        fi
    fi
    install -d -m 0755 "$R/etc/sysctl.d"
    install -m 0644 "$SRC/contrib/sysctl/60-nat64ho.conf" "$R$SYSCTL"
    if [ -z "$LAYOUT" ] && [ "$current" -lt "$wanted" ]; then
        if sysctl -q -p "$SYSCTL"; then
            say "Raised net.core.rmem_max to $wanted ($SYSCTL)"
        else
            warn "could not raise net.core.rmem_max now (the next boot does): the server's receive buffer stays smaller until then"
        fi
    fi
}

# `nat64ho` on PATH: the installed code, with the installed database as the
# default --db (NAT64HO_DB and --db still win).
install_wrapper() {
    install -d -m 0755 "$R$(dirname "$WRAPPER")"
    cat >"$R$WRAPPER" <<WRAPPER_EOF
#!/bin/sh
# Written by install.sh: the installed nat64ho; its database is the default.
NAT64HO_DB=\${NAT64HO_DB:-$DATA_DIR/nat64ho.db}
export NAT64HO_DB
exec $VENV/bin/nat64ho "\$@"
WRAPPER_EOF
    chmod 0755 "$R$WRAPPER"
}

write_install_conf() {
    local tmp
    tmp=$(mktemp "$R$HOME_DIR/.install.conf.XXXXXX")
    {
        say "# Written by install.sh on every install; read by it and by nat64ho-update."
        say "# Not settings: those are in $SETTINGS."
        say "SOURCE=$SRC"
        say "PYTHON=$PY"
        say "AUTO_UPDATE=$1"
        say "LOG_KEEP=$2"
        # Kept so nat64ho-update can skip a rebuild when nothing changed.
        say "INSTALLED_COMMIT=$(read_var "$R$INSTALL_CONF" INSTALLED_COMMIT)"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$R$INSTALL_CONF"
}

write_dropin() {
    cat <<EOF
# Written by install.sh --auto-update; removed by install.sh --no-auto-update.
[Service]
# '-': a failed update is logged and the service starts with the code it has.
# '+': starts as root without the sandbox, only to run git as the checkout's
# owner, the build as nat64ho, and to switch the venv link the service may
# not write.
ExecStartPre=-+$BIN_DIR/nat64ho-update
# Fetching and building take longer than starting.
TimeoutStartSec=5min
EOF
}

# Writes to FILE the settings this run leaves: the existing file with only the
# lines named by --listen/--metrics/--api changed, or a new one.
make_settings() {
    local out=$1 f=$R$SETTINGS metrics=$DEFAULT_METRICS
    if [ -n "$METRICS_SET" ]; then metrics=$METRICS; fi
    if [ -f "$f" ]; then
        cp "$f" "$out"
        if [ -n "$LISTEN" ]; then set_var "$out" NAT64HO_LISTEN "$LISTEN"; fi
        if [ -n "$METRICS_SET" ]; then set_var "$out" NAT64HO_METRICS "$METRICS"; fi
        if [ -n "$API_SET" ]; then set_var "$out" NAT64HO_API "${API_SET#off}"; fi
        return
    fi
    cat >"$out" <<SETTINGS_EOF
# Settings of the nat64ho service, read by $UNIT.
# install.sh writes this file once and never overwrites it (except the line
# named by its --listen, --metrics or --api option). After a change:
#   systemctl restart nat64ho
# Syntax: systemd EnvironmentFile (KEY=value, quotes optional, no \$expansion).

# UDP address and port the server listens on (PROTOCOL.md: 6464).
NAT64HO_LISTEN=${LISTEN:-$DEFAULT_LISTEN}

# IPv4 prefixes allowed to say HELLO, separated by spaces, e.g.
# "192.0.2.0/24 198.51.100.7". Empty: any address may.
NAT64HO_ALLOW=

# Prometheus metrics endpoint (HTTP, ADDR:PORT). Empty: off.
NAT64HO_METRICS=$metrics

# The attribution API (docs/api.md): unix:$API_SOCKET, a socket 0660 of
# group nat64ho (add nginx's user to the group), or ADDR:PORT. Empty: off.
NAT64HO_API=${API_SET#off}

# Any other 'nat64ho serve' options, e.g. "--min-idle 120 --sync normal".
# All of them: nat64ho serve --help
NAT64HO_ARGS=
SETTINGS_EOF
}

print_howto() {
    local metrics api
    metrics=$(read_var "$SETTINGS" NAT64HO_METRICS)
    cat <<EOF

nat64ho is running.
  systemctl status nat64ho                  state, last messages
  journalctl -u nat64ho -f                  operational messages
  tail -f $LOG_DIR/nat64ho.log   the event log (Created/Deleted/Initialized)
  $SETTINGS                      settings; then: systemctl restart nat64ho
EOF
    if [ -n "$metrics" ]; then say "  curl -s http://$metrics/metrics     Prometheus metrics"; fi
    api=$(read_var "$SETTINGS" NAT64HO_API)
    if [ "${api#unix:}" != "$api" ]; then
        say "  curl -s --unix-socket ${api#unix:} 'http://nat64ho/v1/client?nat=192.0.2.9&port=47102'"
        say "                                            who holds a NAT port now (docs/api.md)"
    fi
    cat <<EOF
  nat64ho who 192.0.2.9:47102 --at '2019-03-18 15:00'
                                            who held a NAT port then (also: query, stats, export;
                                            as root or a member of group nat64ho)
EOF
}

# ------------------------------------------------------------------ removal

do_uninstall() {
    check_remove --uninstall
    if [ -z "$LAYOUT" ] && [ -d /run/systemd/system ] && [ -f "$UNIT" ]; then
        systemctl disable --now --quiet "$NAME.service" || true
    fi
    # The running kernel keeps its rmem_max: lowering it could hurt others.
    rm -f "$R$UNIT" "$R$LOGROTATE" "$R$SYSCTL" "$R$WANTS_DIR/$NAME.service" "$R$WRAPPER"
    rm -rf "$R$DROPIN_DIR" "$R$VENV" "$R$BIN_DIR" "$R$HOME_DIR/releases" "$R$HOME_DIR/wheels"
    rm -f "$R$INSTALL_CONF" "$R$HOME_DIR/requirements.txt"
    if [ -z "$LAYOUT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl reset-failed "$NAME.service" 2>/dev/null || true
    fi
    say "Removed the nat64ho service and code${LAYOUT:+ under $ROOT}."
    if [ "$ACTION" = uninstall ]; then
        say "Kept: $R$DATA_DIR (database), $R$LOG_DIR (event logs), $R$SETTINGS, user $NAME."
        say "Remove those too with: ./install.sh --purge${LAYOUT:+ --root $ROOT}"
    fi
}

do_purge() {
    check_remove --purge
    say "--purge removes, with no way back:"
    say "  $R$HOME_DIR (the database in $DATA_DIR, the event logs in $LOG_DIR, the venv)"
    say "  $R$SETTINGS (settings)"
    say "  the user and group $NAME${LAYOUT:+ (lines in $R/etc/passwd and group)}"
    say "  the service, the logrotate file and $R$INSTALL_CONF (as --uninstall)"
    if [ -z "$YES" ]; then
        [ -t 0 ] || die "not a terminal: add --yes to confirm --purge; nothing was changed"
        local answer
        read -r -p "Type 'purge' to go on: " answer
        [ "$answer" = purge ] || die "not confirmed; nothing was changed"
    fi
    do_uninstall
    rm -rf "$R$HOME_DIR"
    rm -f "$R$SETTINGS"
    remove_user
    say "Purged nat64ho${LAYOUT:+ under $ROOT}."
}

umask 022
case $ACTION in
    install) do_install ;;
    uninstall) do_uninstall ;;
    purge) do_purge ;;
esac
