#!/usr/bin/env bash
# Let the staging calls carry only their part (run here, in the checkout, around the staging calls).
#
#   bash gpu/quiet_tree.sh on     # nothing of the checkout travels with a device call (62 MiB for the part)
#   ... the staging calls: carry [".stage/pNN"], command "mkdir -p /tmp/stage && cp .stage/pNN /tmp/stage/"
#   bash gpu/quiet_tree.sh off    # back as it was (do this before any call that runs the project's code)
#
# A device call sends the tracked and the untracked-but-not-ignored files of the checkout beside what `carry`
# names, 64 MiB in all; this checkout is ~40 MiB (the fixtures), which would leave ~22 MiB a call for the wheels
# (60 calls for vLLM 0.33; 21 of 62 MiB this way, gpu/stage.sh's default). `on` saves git's index and .git/info/exclude, empties the index (the
# files on disk are not touched) and ignores everything; `off` puts both back. Nothing is committed or lost;
# don't commit or run git commands that write the index while it is on.
set -euo pipefail
cd "$(dirname "$0")/.."
g=$(git rev-parse --git-dir)
case "${1:-}" in
  on)
    [ -e "$g/index.quiet-tree" ] && { echo "already on" >&2; exit 1; }
    cp "$g/index" "$g/index.quiet-tree"
    cp "$g/info/exclude" "$g/info/exclude.quiet-tree"
    git rm -r -q --cached .
    echo '/*' >> "$g/info/exclude"
    echo "travels now: $(git ls-files | wc -l) tracked, $(git ls-files --others --exclude-standard | wc -l) untracked files"
    ;;
  off)
    [ -e "$g/index.quiet-tree" ] || { echo "not on" >&2; exit 1; }
    mv "$g/index.quiet-tree" "$g/index"
    mv "$g/info/exclude.quiet-tree" "$g/info/exclude"
    echo "restored: $(git ls-files | wc -l) tracked files"
    ;;
  *) echo "usage: $0 on|off" >&2; exit 2 ;;
esac
