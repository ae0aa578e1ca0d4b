#!/bin/sh
# Rolls a new version of a template service (by default examples/web@.service) over its
# running instances, two at a time, and says how it ended (docs/services.md, "Rolling updates").
#
#   examples/rollout.sh VERSION [TEMPLATE_FILE]
#
# The new version is the template with its `Environment=VERSION=` line set to VERSION; fleetctl
# follows the rollout and exits 1 if it went back (an instance did not become healthy).
set -eu
version=${1:?usage: rollout.sh VERSION [TEMPLATE_FILE]}
file=${2:-$(dirname "$0")/web@.service}
name=$(basename "$file")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s/^Environment=VERSION=.*/Environment=VERSION=$version/" "$file" > "$work/$name"
if fleetctl rollout --max-parallel 2 --min-healthy-time 2s --deadline 2m "$work/$name"; then
    echo "version $version of $name is out"
else
    echo "version $version of $name went back:" >&2
    fleetctl rollout status "$name" >&2
    exit 1
fi
