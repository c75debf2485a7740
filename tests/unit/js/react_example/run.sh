#!/usr/bin/env bash
# Runs the README's React example under <StrictMode> (effects run twice) in jsdom against a fake API,
# once with no visitor yet and once with a token already kept, and checks that it makes ONE chat and
# shows the answer. Not part of CI (it needs the npm registry): run it after editing the example.
#   bash tests/unit/js/react_example/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/setup.js" "$work/"
cd "$work"
npm init -y >/dev/null
npm install --silent --no-audit --no-fund react@18 react-dom@18 jsdom@24 esbuild@0.23 >/dev/null
python3 - "$repo/README.md" example.jsx "$repo/api/static/client/streambridge.js" <<'PY'
import sys
text = open(sys.argv[1]).read()
block = text[text.index("With React (`useEffect`"):]
code = block[block.index("```jsx\n") + 7:]
code = code[: code.index("```")].replace('from "streambridge";', f'from "{sys.argv[3]}";')
open(sys.argv[2], "w").write(code)
PY
sed "s#./EXAMPLE#./example.jsx#" "$here/harness.jsx" > harness.jsx
node_modules/.bin/esbuild harness.jsx --bundle --platform=node --format=esm --jsx=automatic --outfile=harness.mjs \
  --log-level=warning --external:jsdom --external:react --external:react-dom --external:react/jsx-runtime
node harness.mjs
WITH_TOKEN=1 node harness.mjs
echo "react example: one chat under StrictMode, with and without a kept token"
