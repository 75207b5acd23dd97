#!/usr/bin/env bash
# Side-by-side conversion benchmark: imgconv against qemu-img convert on the same inputs, in one run.
# Medians of N runs (default 5); wall time, CPU seconds (user+sys) and peak RSS from GNU time.
# Usage: bench/convert.sh [corpus-dir] [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/imgconv-bench}
runs=${2:-5}
bash bench/make-corpus.sh "$dir" >/dev/null
swift build -c release --product imgconv >/dev/null
IMGCONV=$(swift build -c release --show-bin-path)/imgconv
out="$dir/out"
mkdir -p "$out"

# One measurement: prints "wall cpu rss_kib".
measure() {
    sync
    rm -f "$out/target"
    /usr/bin/time -f "%e %U %S %M" -o "$out/time" "$@" >/dev/null 2>&1
    read -r wall user sys rss < "$out/time"
    echo "$wall $(echo "$user + $sys" | bc) $rss"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench NAME -- COMMAND...   (the target path is $out/target)
bench() {
    local name=$1; shift
    local walls=() cpus=() rsss=()
    for _ in $(seq "$runs"); do
        read -r w c r < <(measure "$@")
        walls+=("$w"); cpus+=("$c"); rsss+=("$r")
    done
    printf "%s\t%s\t%s\t%s\n" "$name" "$(printf '%s\n' "${walls[@]}" | median)" \
        "$(printf '%s\n' "${cpus[@]}" | median)" "$(( $(printf '%s\n' "${rsss[@]}" | median) / 1024 ))"
}

results="$out/results.tsv"
: > "$results"
# case label | source | source format | target format and options
cases=(
    "a zlib qcow2 -> raw|mixed-zlib.qcow2|qcow2|-O raw"
    "b qcow2 -> raw|mixed.qcow2|qcow2|-O raw"
    "c raw -> qcow2|mixed.raw|raw|-O qcow2"
    "c raw -> qcow2 -c|mixed.raw|raw|-O qcow2 -c"
    "c raw -> vmdk streamOptimized|mixed.raw|raw|-O vmdk -o subformat=streamOptimized"
    "c raw -> vpc|mixed.raw|raw|-O vpc"
    "c raw -> vdi|mixed.raw|raw|-O vdi"
    "d 1 TiB sparse qcow2 -> raw|huge.qcow2|qcow2|-O raw"
)
only=${ONLY:-}
for c in "${cases[@]}"; do
    IFS='|' read -r label src sfmt target <<< "$c"
    [ -z "$only" ] || [[ "$label" == *"$only"* ]] || continue
    # shellcheck disable=SC2086
    bench "$label|imgconv" "$IMGCONV" convert -f "$sfmt" $target "$dir/$src" "$out/target" >> "$results"
    # shellcheck disable=SC2086
    bench "$label|imgconv -t unsafe" "$IMGCONV" convert -t unsafe -f "$sfmt" $target "$dir/$src" "$out/target" >> "$results"
    if [[ "$label" == a* ]]; then
        # shellcheck disable=SC2086
        bench "$label|imgconv, zlib inflate" env IMGCONV_INFLATE=zlib "$IMGCONV" convert -f "$sfmt" $target "$dir/$src" "$out/target" >> "$results"
    fi
    # shellcheck disable=SC2086
    bench "$label|qemu-img" qemu-img convert -f "$sfmt" $target "$dir/$src" "$out/target" >> "$results"
    # shellcheck disable=SC2086
    bench "$label|qemu-img -m 8 -W" qemu-img convert -m 8 -W -f "$sfmt" $target "$dir/$src" "$out/target" >> "$results"
    # Durable like imgconv's default: the same, then fsync the output (coreutils sync FILE).
    bench "$label|qemu-img, sync FILE" bash -c "qemu-img convert -f $sfmt $target $dir/$src $out/target && sync $out/target" >> "$results"
    bench "$label|qemu-img -m 8 -W, sync FILE" bash -c "qemu-img convert -m 8 -W -f $sfmt $target $dir/$src $out/target && sync $out/target" >> "$results"
done
rm -f "$out/target"

echo "| case | tool | wall s (median of $runs) | CPU s | peak RSS MiB | peer time / imgconv time (durable; -t unsafe) |"
echo "|---|---|---|---|---|---|"
awk -F'\t' '{
    split($1, p, "|"); c = p[1]; t = p[2]
    if (t == "imgconv") base[c] = $2
    if (t == "imgconv -t unsafe") ubase[c] = $2
    rows[NR] = c "\t" t "\t" $2 "\t" $3 "\t" $4
} END {
    for (i = 1; i <= NR; i++) {
        split(rows[i], f, "\t")
        ratio = (f[2] ~ /^imgconv/) ? "" : sprintf("%.2fx; %.2fx", f[3] / base[f[1]], f[3] / ubase[f[1]])
        printf "| %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], ratio
    }
}' "$results"
