#!/usr/bin/env bash
# Rebuild the vendored Uppy bundle of the demo page (tusserver/http/static/vendor/uppy/) from npm.
#
# The files are Uppy's own prebuilt bundle (dist/uppy.min.js and dist/uppy.min.css of the
# npm package `uppy`), copied unchanged, with Uppy's LICENSE, the licence texts of every
# package in its dependency tree (the bundle inlines them) and a VERSION file with their
# SHA-256 sums. They are committed, so `pip install .` needs no Node and the page works
# offline. Needs node and npm; run from anywhere: bash scripts/build-demo-page.sh
set -euo pipefail

UPPY_VERSION=6.0.1

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/tusserver/http/static/vendor/uppy"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$work"
npm init --yes >/dev/null
npm install --no-audit --no-fund --ignore-scripts --omit=dev --loglevel=error \
  "uppy@$UPPY_VERSION" >/dev/null
dist="$work/node_modules/uppy/dist"
installed=$(node -p "require('./node_modules/uppy/package.json').version")
if [ "$installed" != "$UPPY_VERSION" ]; then
  echo "npm installed uppy $installed, not $UPPY_VERSION" >&2
  exit 1
fi

rm -rf "$dest"
mkdir -p "$dest"
cp "$dist/uppy.min.js" "$dist/uppy.min.css" "$dest/"
cp "$work/node_modules/uppy/LICENSE" "$dest/LICENSE.txt"

# One file with the name, version, licence and licence text of every package in the tree.
npm ls --all --omit=dev --parseable 2>/dev/null | sort -u | node -e '
const fs = require("fs")
const path = require("path")
const dirs = fs.readFileSync(0, "utf8").split("\n").filter((d) => d.includes("node_modules"))
const out = ["Licences of the packages in Uppy " + process.argv[1] + " and its dependency tree,",
  "collected by scripts/build-demo-page.sh.", ""]
for (const dir of dirs) {
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"))
  const licence = fs.readdirSync(dir).find((f) => /^(licen[cs]e|copying)/i.test(f))
  out.push("=".repeat(78), `${pkg.name} ${pkg.version} (${pkg.license || "see below"})`, "")
  out.push(licence ? fs.readFileSync(path.join(dir, licence), "utf8").trim()
                   : "(no licence file in the package; package.json says: " + pkg.license + ")")
  out.push("")
}
process.stdout.write(out.join("\n"))
' "$UPPY_VERSION" > "$dest/THIRD-PARTY-LICENSES.txt"

{
  echo "uppy $UPPY_VERSION (npm), prebuilt bundle copied unchanged by scripts/build-demo-page.sh"
  (cd "$dest" && sha256sum uppy.min.js uppy.min.css)
} > "$dest/VERSION"
echo "vendored uppy $UPPY_VERSION into ${dest#"$root"/}"
