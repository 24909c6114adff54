#!/usr/bin/env bash
# A narrated tour of asd on a throwaway target. Everything happens in private mount
# namespaces with their own /run and VOLATILE, under a temporary directory: nothing of the
# host is mounted, changed or read beyond that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
work=$(mktemp -d /var/tmp/asd-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export ASD_DEMO_WORK=$work ASD_DEMO_PY=$py PYTHONPATH=$here

mkdir -p "$work/disk/profile/cache" "$work/volatile"
for i in 1 2 3; do echo "page $i" > "$work/disk/profile/cache/page$i.html"; done
echo "bookmarks v1" > "$work/disk/profile/bookmarks"
cat > "$work/asd.conf" <<CONF
# A config as users write it for upstream asd.
WHATTOSYNC=(
  '$work/disk/profile'   # a browser profile
)
VOLATILE="$work/volatile"
CONF

# One "boot" of the demo machine: a private mount namespace with RAM on /run and VOLATILE.
boot() {
  unshare -m --propagation private bash -euo pipefail -c '
    mount -t tmpfs -o mode=0755 demo-run /run
    mount -t tmpfs -o size=64m,mode=1777 demo-ram "$ASD_DEMO_WORK/volatile"
    asd() { echo "\$ asd $*"; "$ASD_DEMO_PY" -m asd -c "$ASD_DEMO_WORK/asd.conf" "$@"; }
    say() { printf "\n== %s\n" "$*"; }
    # A power cut stops every process too: asd'"'"'s change tracker of this namespace.
    power_cut() {
      for p in $(pgrep -x asd-tracker || true); do
        [ "$(readlink /proc/$p/ns/mnt)" = "$(readlink /proc/$$/ns/mnt)" ] && kill -9 "$p"
      done
      echo "POWER CUT: every mount and all of RAM are gone."
    }
    t=$ASD_DEMO_WORK/disk/profile
    '"$1"
}

boot '
say "What asd will do (asd parse):"
asd parse
say "Sync: the profile moves into RAM; the disk copy stays reachable beside it."
asd sync
grep -E "profile|volatile" /proc/self/mountinfo | cut -d" " -f5,9 | sed "s|$ASD_DEMO_WORK|<demo>|g"
say "A program writes to the profile: the writes go to RAM only."
echo "bookmarks v2" > "$t/bookmarks"; echo "page 4" > "$t/cache/page4.html"
echo "in RAM:  $(cat "$t/bookmarks")"
echo "on disk: $(cat "$ASD_DEMO_WORK/disk/.profile-backup_asd/bookmarks")"
say "Resync (the hourly timer does this): changes are written back, crash-safely."
asd resync
echo "on disk: $(cat "$ASD_DEMO_WORK/disk/.profile-backup_asd/bookmarks")"
say "More writes after the resync, then the power fails before the next one."
echo "bookmarks v3 (never resynced)" > "$t/bookmarks"
power_cut
'
echo
echo "== After the power cut, the plain directory on disk holds the last sync point:"
echo "bookmarks: $(cat "$work/disk/profile/bookmarks")"
boot '
say "Next boot: asd sync notices the unclean stop and keeps a snapshot first."
asd sync
ls -la "$ASD_DEMO_WORK/disk" | grep crashrecovery | sed "s|$ASD_DEMO_WORK|<demo>|g"
asd parse | sed -n "/snapshot/p"
say "Unsync (what stopping the service does): write back, unmount, clean up."
echo "bookmarks v4" > "$t/bookmarks"
asd unsync
say "The profile is a plain directory again, with the latest data; nothing of asd is left."
echo "bookmarks: $(cat "$t/bookmarks")"
ls -A "$ASD_DEMO_WORK/disk" "$ASD_DEMO_WORK/volatile"
'
echo
echo "== Demo finished; its temporary directory is removed."
