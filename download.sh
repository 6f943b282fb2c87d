#!/usr/bin/env bash
# Download Llama 3, 3.1, 3.2 (1B, 3B) and 3.3 weights with the presigned URL Meta sends by email.
#
# Interactive:      bash download.sh
# Non-interactive:  PRESIGNED_URL='https://...' MODEL_SIZE=8B,70B-instruct bash download.sh
#                   (answers may also be piped on stdin: URL line, then model list line)
#
# Environment variables (all optional):
#   PRESIGNED_URL  the URL from Meta's email (asked for when unset or empty)
#   MODEL_SIZE     comma-separated models (asked for when unset; empty = all models)
#   TARGET_FOLDER  where to put the files (default: .)
#   WGET           downloader command (default: wget). It is called as
#                    $WGET --continue -q --show-progress [--progress=dot:giga] -O DEST -i -
#                  with the URL on stdin, so the URL never appears in argv (ps);
#                  --progress=dot:giga is added when stderr is not a terminal.
#
# Model names (case-insensitive):
#   Llama 3:    8B, 8B-instruct, 70B, 70B-instruct
#   Llama 3.1:  3.1-8B, 3.1-8B-instruct, 3.1-70B, 3.1-70B-instruct
#   Llama 3.2:  3.2-1B, 3.2-1B-instruct, 3.2-3B, 3.2-3B-instruct (text models)
#   Llama 3.3:  3.3-70B-instruct
#   or the full folder name, e.g. Meta-Llama-3-8B-Instruct, Meta-Llama-3.1-70B, Llama-3.2-1B-Instruct.
#
# The presigned URL is a secret: this script never echoes or logs it.
# Written to work with bash 3.2 (macOS) as well as current bash.

set -euo pipefail

ALL_MODELS="Meta-Llama-3-8B Meta-Llama-3-8B-Instruct Meta-Llama-3-70B Meta-Llama-3-70B-Instruct \
Meta-Llama-3.1-8B Meta-Llama-3.1-8B-Instruct Meta-Llama-3.1-70B Meta-Llama-3.1-70B-Instruct \
Llama-3.2-1B Llama-3.2-1B-Instruct Llama-3.2-3B Llama-3.2-3B-Instruct Llama-3.3-70B-Instruct"
SUPPORTED_NAMES="8B, 8B-instruct, 70B, 70B-instruct, 3.1-8B, 3.1-8B-instruct, 3.1-70B, 3.1-70B-instruct, \
3.2-1B, 3.2-1B-instruct, 3.2-3B, 3.2-3B-instruct, 3.3-70B-instruct"

die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Map a user-supplied model name to its folder name; non-zero status if unknown.
resolve_model() {
    local key
    key=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
    key=${key#meta-llama-}
    key=${key#llama-}
    case $key in
        8b | 3-8b) echo "Meta-Llama-3-8B" ;;
        8b-instruct | 3-8b-instruct) echo "Meta-Llama-3-8B-Instruct" ;;
        70b | 3-70b) echo "Meta-Llama-3-70B" ;;
        70b-instruct | 3-70b-instruct) echo "Meta-Llama-3-70B-Instruct" ;;
        3.1-8b) echo "Meta-Llama-3.1-8B" ;;
        3.1-8b-instruct) echo "Meta-Llama-3.1-8B-Instruct" ;;
        3.1-70b) echo "Meta-Llama-3.1-70B" ;;
        3.1-70b-instruct) echo "Meta-Llama-3.1-70B-Instruct" ;;
        3.2-1b) echo "Llama-3.2-1B" ;;
        3.2-1b-instruct) echo "Llama-3.2-1B-Instruct" ;;
        3.2-3b) echo "Llama-3.2-3B" ;;
        3.2-3b-instruct) echo "Llama-3.2-3B-Instruct" ;;
        3.3-70b-instruct) echo "Llama-3.3-70B-Instruct" ;;
        *) return 1 ;;
    esac
}

# Number of consolidated.NN.pth shards for a model folder.
shard_count() {
    case $1 in
        *-1B | *-1B-Instruct | *-3B | *-3B-Instruct | *-8B | *-8B-Instruct) echo 1 ;;
        *-70B | *-70B-Instruct) echo 8 ;;
        *) die "internal error: no shard count for $1" ;;
    esac
}

# download REMOTE_PATH DEST: fetch REMOTE_PATH (the part that replaces '*' in the URL).
download() {
    local path=$1 dest=$2 url rc=0
    url=${PRESIGNED_URL/"*"/"$path"}
    # The URL goes to wget on stdin (printf is a builtin), and -q keeps wget from
    # printing it; --show-progress shows only the output file name.
    printf '%s\n' "$url" | "${WGET_CMD[@]}" --continue -q --show-progress $PROGRESS_OPT -O "$dest" -i - || rc=$?
    if [ "$rc" -ne 0 ]; then
        # wget -O leaves an empty file behind on failure; don't keep it around.
        if [ -f "$dest" ] && [ ! -s "$dest" ]; then
            rm -f "$dest"
        fi
        die "download failed for $path: the URL may have expired (they last 24 hours); request a new one (wget exit status $rc)"
    fi
}

# Print "FILE" lines (one per line) for the files failing their checksum; Linux version.
failed_files_md5sum() {
    local dir=$1 out rc=0
    out=$(cd "$dir" && md5sum -c checklist.chk 2>&1) || rc=$?
    printf '%s\n' "$out" | grep -v ': OK$' >&2 || true
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$out" | sed -n 's/: FAILED.*$//p'
        return 1
    fi
}

# Same as failed_files_md5sum, using macOS's `md5 -r` (prints "HASH FILE").
failed_files_md5() {
    local dir=$1 line expected name actual checked=0 bad=0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        case $line in "" | "#"*) continue ;; esac
        expected=${line%%[[:space:]]*}
        name=${line#"$expected"}
        # strip the separator: spaces, and the '*' that marks binary mode
        while :; do
            case $name in
                [[:space:]]* | "*"*) name=${name:1} ;;
                *) break ;;
            esac
        done
        [ -n "$name" ] || continue
        checked=$((checked + 1))
        if [ ! -f "$dir/$name" ]; then
            echo "$name"
            bad=1
            continue
        fi
        actual=$(md5 -r "$dir/$name")
        actual=${actual%%[[:space:]]*}
        expected=$(printf '%s' "$expected" | tr '[:upper:]' '[:lower:]')
        actual=$(printf '%s' "$actual" | tr '[:upper:]' '[:lower:]')
        if [ "$actual" != "$expected" ]; then
            echo "$name"
            bad=1
        fi
    done <"$dir/checklist.chk"
    [ "$checked" -gt 0 ] || return 1
    [ "$bad" -eq 0 ]
}

# verify_model FOLDER: check all files listed in FOLDER/checklist.chk; exit on a mismatch.
verify_model() {
    local model=$1 dir=$TARGET_FOLDER/$1 failed rc=0 name f
    echo "Checking checksums for $model ..."
    if [ "$(uname)" = "Darwin" ]; then
        failed=$(failed_files_md5 "$dir") || rc=$?
    else
        failed=$(failed_files_md5sum "$dir") || rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        if [ -z "$failed" ]; then
            die "could not verify $model: $model/checklist.chk is empty or damaged; delete it and re-run this script (request a new URL if it has expired)"
        fi
        {
            echo "ERROR: checksum mismatch in $model; these files do not match checklist.chk:"
            while IFS= read -r name; do
                if [ -n "$name" ]; then echo "  $model/$name"; fi
            done <<EOF
$failed
EOF
            echo "The download is corrupt or incomplete. Delete the file(s) above and re-run this script;"
            echo "if the URL has expired (they last 24 hours), request a new one from Meta first."
        } >&2
        exit 1
    fi
    # Files we fetched that the checklist does not cover cannot be verified: say so.
    for f in "$dir"/*; do
        name=${f##*/}
        if [ ! -f "$f" ] || [ "$name" = "checklist.chk" ]; then
            continue
        fi
        # (no grep -q: with pipefail an early exit could SIGPIPE the writers)
        if ! tr -d '\r' <"$dir/checklist.chk" | sed 's/^[^[:space:]]*[[:space:]]*[*]\{0,1\}//' |
            grep -xF -- "$name" >/dev/null; then
            echo "WARNING: $model/$name is not listed in checklist.chk and was not verified" >&2
        fi
    done
    echo "$model: all checksums OK"
}

# ---------------------------------------------------------------------------
# Inputs

if [ -z "${PRESIGNED_URL:-}" ]; then
    PRESIGNED_URL=""
    read -r -p "Enter the URL from Meta's email: " PRESIGNED_URL || true
fi
PRESIGNED_URL=${PRESIGNED_URL%$'\r'}
# trim surrounding whitespace from pasted URLs
PRESIGNED_URL=${PRESIGNED_URL#"${PRESIGNED_URL%%[![:space:]]*}"}
PRESIGNED_URL=${PRESIGNED_URL%"${PRESIGNED_URL##*[![:space:]]}"}
[ -n "$PRESIGNED_URL" ] || die "no URL given; paste the URL from Meta's email (or set PRESIGNED_URL)"
case $PRESIGNED_URL in
    http://*"*"* | https://*"*"*) ;;
    *) die "that does not look like the URL from Meta's email (expected an http(s) URL containing '*'); copy the whole URL and try again" ;;
esac

if [ -z "${MODEL_SIZE+set}" ]; then
    MODEL_SIZE=""
    read -r -p "Enter the models to download, comma-separated ($SUPPORTED_NAMES), or press Enter for all: " MODEL_SIZE || true
fi
MODEL_SIZE=${MODEL_SIZE%$'\r'}

TARGET_FOLDER=${TARGET_FOLDER:-.}

# On a terminal wget draws a progress bar; in logs, use one dot per MiB rather than
# the default one per KiB (a 70B shard would otherwise print ~300k lines).
PROGRESS_OPT=""
if [ ! -t 2 ]; then
    PROGRESS_OPT="--progress=dot:giga"
fi

read -r -a WGET_CMD <<<"${WGET:-wget}"
[ "${#WGET_CMD[@]}" -gt 0 ] || die "WGET is set but empty"
command -v "${WGET_CMD[0]}" >/dev/null 2>&1 || die "${WGET_CMD[0]} not found; install wget (e.g. apt-get install wget, brew install wget)"

# Resolve and validate every model name before downloading anything.
MODELS=""
IFS=',' read -r -a REQUESTED <<<"$MODEL_SIZE" || true
for raw in ${REQUESTED[@]+"${REQUESTED[@]}"}; do
    name=${raw#"${raw%%[![:space:]]*}"}
    name=${name%"${name##*[![:space:]]}"}
    [ -n "$name" ] || continue
    if ! folder=$(resolve_model "$name"); then
        die "unknown model '$name'; supported models are: $SUPPORTED_NAMES (or leave empty for all)"
    fi
    case " $MODELS " in
        *" $folder "*) ;;
        *) MODELS="${MODELS:+$MODELS }$folder" ;;
    esac
done
[ -n "$MODELS" ] || MODELS=$ALL_MODELS

# ---------------------------------------------------------------------------
# Download

mkdir -p "$TARGET_FOLDER"

echo "Downloading LICENSE and USE_POLICY.md"
download "LICENSE" "$TARGET_FOLDER/LICENSE"
download "USE_POLICY.md" "$TARGET_FOLDER/USE_POLICY.md"

for model in $MODELS; do
    shards=$(shard_count "$model")
    echo "Downloading $model ($shards shard(s))"
    mkdir -p "$TARGET_FOLDER/$model"
    for file in params.json tokenizer.model checklist.chk; do
        download "$model/$file" "$TARGET_FOLDER/$model/$file"
    done
    s=0
    while [ "$s" -lt "$shards" ]; do
        file=$(printf 'consolidated.%02d.pth' "$s")
        download "$model/$file" "$TARGET_FOLDER/$model/$file"
        s=$((s + 1))
    done
    verify_model "$model"
done

echo "Done: $MODELS downloaded to $TARGET_FOLDER"
