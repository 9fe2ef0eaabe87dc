#!/usr/bin/env bash
# Build dvc_plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined, so
# `dvc plots show` renders without a CDN. Needs npm (the npm registry) once; the result is committed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null
for archive in *.tgz; do mkdir "${archive%.tgz}"; tar xzf "$archive" -C "${archive%.tgz}" --strip-components 1; done
{
  printf '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>cogvx plots</title>\n    <meta charset="utf-8">\n'
  for lib in vega-5.20.2/build/vega.min.js vega-lite-5.2.0/build/vega-lite.min.js vega-embed-6.18.2/build/vega-embed.min.js; do
    printf '    <script>\n'; cat "$lib"; printf '\n    </script>\n'
  done
  printf '    <style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n'
} > "$here/offline.html"
echo "wrote $here/offline.html ($(wc -c < "$here/offline.html") bytes)"
