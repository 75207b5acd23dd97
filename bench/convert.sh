#!/usr/bin/env bash
# Side-by-side conversion benchmark: imgconv against qemu-img convert on the same inputs, in one run.
# Medians of N runs (default 5); wall time, CPU seconds (user+sys) and peak RSS from GNU time.
# Usage: bench/convert.sh [corpus-dir] [runs]
# On a file system that shares extents (XFS, btrfs) imgconv clones what the source stores verbatim: run it there
# too (bench/convert.sh /mnt/xfs/imgconv-bench; scripts/reflink-fs.sh makes such a file system on a loop device).
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

# summarise NAME FILE: one row from the "wall cpu rss" lines in FILE (median; spread min-max).
summarise() {
    local name=$1 file=$2
    printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$(cut -d' ' -f1 "$file" | median)" \
        "$(cut -d' ' -f1 "$file" | sort -n | sed -n '1p;$p' | paste -sd-)" \
        "$(cut -d' ' -f2 "$file" | median)" "$(( $(cut -d' ' -f3 "$file" | median) / 1024 ))"
}

# bench_case LABEL NAME=COMMAND...: every tool once per round, rounds repeated $runs times, so a change in the
# shared machine's load hits every tool alike (the target path is $out/target).
bench_case() {
    local label=$1; shift
    local names=() cmds=() i
    for nc in "$@"; do names+=("${nc%%=*}"); cmds+=("${nc#*=}"); rm -f "$out/m.${#names[@]}"; done
    for _ in $(seq "$runs"); do
        for i in "${!cmds[@]}"; do
            # shellcheck disable=SC2086
            measure bash -c "${cmds[$i]}" >> "$out/m.$((i + 1))"
        done
    done
    for i in "${!names[@]}"; do summarise "$label|${names[$i]}" "$out/m.$((i + 1))"; done
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
    [ -z "$only" ] || [[ "$label" =~ $only ]] || continue
    in="$dir/$src" t="$out/target"
    extra=() copy_offload=()
    # qemu-img -C (copy_file_range: extents shared on XFS and btrfs, an in-kernel copy elsewhere): its own fastest
    # mode where imgconv clones, so it is a peer for the plain-data cases.
    # imgconv -C shares blocks for qcow2, vpc and vdi output too (raw output does by default).
    if [[ "$label" == b* || "$label" == d* ]]; then
        copy_offload=("qemu-img -C=qemu-img convert -C -f $sfmt $target $in $t")
    elif [[ "$label" == c* && "$target" != *-c && "$target" != *streamOptimized* ]]; then
        copy_offload=("imgconv -C=$IMGCONV convert -C -f $sfmt $target $in $t" "qemu-img -C=qemu-img convert -C -f $sfmt $target $in $t")
    fi
    [[ "$label" == a* ]] && extra=("imgconv, zlib inflate=IMGCONV_INFLATE=zlib $IMGCONV convert -f $sfmt $target $in $t")
    bench_case "$label" \
        "imgconv=$IMGCONV convert -f $sfmt $target $in $t" \
        "imgconv -t writeback=$IMGCONV convert -t writeback -f $sfmt $target $in $t" \
        "imgconv -t unsafe=$IMGCONV convert -t unsafe -f $sfmt $target $in $t" \
        "${extra[@]}" \
        "qemu-img=qemu-img convert -f $sfmt $target $in $t" \
        "qemu-img -m 8 -W=qemu-img convert -m 8 -W -f $sfmt $target $in $t" \
        "qemu-img -t none=qemu-img convert -t none -f $sfmt $target $in $t" \
        "${copy_offload[@]}" >> "$results"
    # (qemu-img -t none is Nova's own command line: nova/virt/images.py, where the directory takes O_DIRECT.)
done
rm -f "$out/target"

echo "| case | tool | wall s (median of $runs) | spread (min-max) | CPU s | peak RSS MiB | peer time / imgconv time |"
echo "|---|---|---|---|---|---|---|"
awk -F'\t' '{
    split($1, p, "|"); c = p[1]; t = p[2]
    if (t == "imgconv") base[c] = $2
    if (t == "imgconv -C") shared[c] = $2
    if (t == "qemu-img" || t == "qemu-img -m 8 -W" || t == "qemu-img -C") { if (!(c in best) || $2 < best[c]) best[c] = $2 }
    rows[NR] = c "\t" t "\t" $2 "\t" $3 "\t" $4 "\t" $5
} END {
    for (i = 1; i <= NR; i++) {
        split(rows[i], f, "\t")
        ratio = (f[2] ~ /^imgconv/) ? "" : sprintf("%.2fx", f[3] / base[f[1]])
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], f[6], ratio
    }
    print ""
    print "| case | imgconv (durable, O_DIRECT) | faster qemu-img (never flushes) | ratio | target |"
    print "|---|---|---|---|---|"
    for (c in base) {
        target = (c ~ /^a/) ? ">= 2.0x" : ((c ~ /^d/) ? "<= 0.1 s" : ">= 1.0x")
        printf "| %s | %s | %s | %.2fx | %s |\n", c, base[c], best[c], best[c] / base[c], target
        if (c in shared) printf "| %s, imgconv -C | %s | %s | %.2fx | %s |\n", c, shared[c], best[c], best[c] / shared[c], target
    }
}' "$results"
