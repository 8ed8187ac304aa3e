#!/usr/bin/env bash
# Each library crate can be packaged on its own: `cargo package --list`
# succeeds, and every file its sources embed (include_str!, include_bytes!)
# lies inside the crate and is in that list, so a project that depends on
# the published crate builds. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
for dir in crates/format crates/record crates/analyze crates/report crates/tch; do
  name=$(sed -n 's/^name = "\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n 1)
  list=$(cargo package --list --allow-dirty --locked -p "$name" 2>&1) || {
    echo "check-package: cargo package --list -p $name failed:"; echo "$list"; fail=1; continue
  }
  # Every embedded path, resolved from the file that names it.
  while IFS=: read -r file _ path; do
    [ -n "$path" ] || continue
    resolved=$(realpath -ms "$(dirname "$file")/$path")
    crate_root=$(realpath -s "$dir")
    rel=${resolved#"$crate_root"/}
    if [ "$rel" = "$resolved" ]; then
      echo "check-package: $file embeds $path, outside $dir"; fail=1
    elif ! grep -qxF "$rel" <<<"$list"; then
      echo "check-package: $file embeds $rel, which cargo package -p $name leaves out"; fail=1
    fi
  done < <(grep -rnoE 'include_(str|bytes)!\("[^"]+"\)' "$dir/src" \
             | sed -E 's/^([^:]+):([0-9]+):include_(str|bytes)!\("([^"]+)"\)$/\1:\2:\4/')
  # include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/x")): relative to the crate.
  while IFS= read -r path; do
    rel=${path#/}
    if [ ! -e "$dir/$rel" ] || ! grep -qxF "$rel" <<<"$list"; then
      echo "check-package: $dir embeds \$CARGO_MANIFEST_DIR$path, not packaged"; fail=1
    fi
  done < <(grep -rhozE 'env!\("CARGO_MANIFEST_DIR"\),[[:space:]]*"[^"]+"' "$dir/src" 2>/dev/null \
             | tr '\0' '\n' | sed -nE 's/.*"(\/[^"]+)"$/\1/p')
  [ "$fail" = 0 ] && echo "check-package: $name packages on its own ($(wc -l <<<"$list") files)"
done
exit $fail
