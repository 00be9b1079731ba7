#!/usr/bin/env bash
# Pin images/Dockerfile's base image to the digest its tag points to now: rewrites
#   ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm   ->   ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:...
# Needs registry access and `docker buildx` or `skopeo`. The digest is the multi-platform index's, as a pull by
# tag resolves it. Commit the change; nobody should write a digest by hand.
#   images/resolve-digests.sh           resolve and write
#   images/resolve-digests.sh --check   exit 1 if the pinned digest is no longer the tag's (e.g. in a release job)
set -euo pipefail
dockerfile="$(cd "$(dirname "$0")" && pwd)/Dockerfile"
mode=${1:-write}

line=$(grep -E '^ARG PYTHON_IMAGE=' "$dockerfile")
ref=${line#ARG PYTHON_IMAGE=}
tag=${ref%%@*}
pinned=${ref#"$tag"}
pinned=${pinned#@}

if command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
  # The json form: some buildx versions ignore a plain template and print the default report.
  digest=$(docker buildx imagetools inspect "$tag" --format '{{json .Manifest.Digest}}' | tr -d '"[:space:]')
elif command -v skopeo >/dev/null 2>&1; then
  # The digest of the top-level manifest (the index for a multi-platform tag) is the sha256 of its raw bytes.
  digest="sha256:$(skopeo inspect --raw "docker://$tag" | sha256sum | cut -d' ' -f1)"
else
  echo "resolve-digests.sh: needs docker buildx or skopeo" >&2
  exit 2
fi
if [[ ! $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "resolve-digests.sh: no digest for $tag (got '$digest')" >&2
  exit 1
fi

if [[ $mode == --check ]]; then
  if [[ $pinned != "$digest" ]]; then
    echo "$tag is $digest; the Dockerfile pins '${pinned:-no digest}'" >&2
    exit 1
  fi
  echo "$tag@$digest: pinned and current"
else
  sed -i.bak -E "s|^ARG PYTHON_IMAGE=.*$|ARG PYTHON_IMAGE=$tag@$digest|" "$dockerfile" && rm -f "$dockerfile.bak"
  echo "pinned $tag@$digest in $dockerfile"
fi
