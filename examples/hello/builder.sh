# Builder for the demo derivations: run by /bin/sh with the environment nixb sets up
# (PATH=/path-not-set, so use the host's tools by absolute path).
set -e
PATH=/usr/bin:/bin
case "$name" in
greeting)
    mkdir -p "$out"
    echo "Hello from a nixb build" > "$out/greeting.txt"
    ;;
hello)
    mkdir -p "$out/bin"
    printf '#!/bin/sh\nexec cat %s/greeting.txt\n' "$greeting" > "$out/bin/hello"
    chmod +x "$out/bin/hello"
    echo "built hello against $greeting"
    ;;
esac
