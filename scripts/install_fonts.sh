#!/usr/bin/env bash
# Chinese OCR images need a CJK font; matplotlib's DejaVu covers Vietnamese but no Chinese.
# Debian's fonts-noto-cjk when apt is available; the synthetic generator searches these paths.
set -u
if fc-list 2>/dev/null | grep -qi "cjk" || ls /usr/share/fonts/opentype/noto/NotoSansCJK* >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk fonts-dejavu-core) >/dev/null 2>&1 \
    || echo "warning: could not install fonts-noto-cjk; Chinese OCR images fall back to a box font" >&2
else
  echo "warning: no CJK font and no apt: Chinese OCR images fall back to a box font" >&2
fi
exit 0
