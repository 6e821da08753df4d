#!/usr/bin/env bash
# Proves a report renders in a real browser: opens REPORT.html in headless Chromium (Debian's
# `chromium`, installed when missing), checks the rendered DOM holds the plots, takes a
# screenshot and checks the plots drew pixels (non-white area inside the page).
#   loadtest/scripts/check-report.sh DIR/report.html [SHOT.png]
set -euo pipefail
report=$(readlink -f "$1")
shot=${2:-${report%.html}.png}
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2600)
dom=$(chromium "${flags[@]}" --dump-dom "file://$report" 2>/dev/null)
svgs=$(grep -o '<svg' <<<"$dom" | wc -l)
shapes=$(grep -oE '<(rect|circle|polyline)' <<<"$dom" | wc -l)
echo "rendered DOM: $svgs plots, $shapes drawn shapes"
[ "$svgs" -ge 4 ] && [ "$shapes" -ge 10 ] || { echo "plots missing from the rendered page" >&2; exit 1; }
chromium "${flags[@]}" --screenshot="$shot" "file://$report" >/dev/null 2>&1
python3 - "$shot" <<'PY'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, w = 8, b"", 0
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
bpp = {2: 3, 6: 4}[ctype]
raw, stride = zlib.decompress(idat), w * bpp
rows, prev = [], bytearray(stride)
for y in range(h):
    f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        if f == 1: line[i] = (line[i] + a) & 255
        elif f == 2: line[i] = (line[i] + b) & 255
        elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    rows.append(line); prev = line
colored = sum(1 for r in rows for i in range(0, stride, bpp)
              if abs(r[i] - r[i + 1]) + abs(r[i + 1] - r[i + 2]) > 60)
print(f"screenshot {w}x{h}: {colored} coloured pixels (plot marks)")
assert colored > 2000, "the plots drew (almost) nothing"
PY
echo "ok: $shot"
