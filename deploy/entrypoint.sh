#!/bin/sh
# Entry point of the encinfer image (and of `encinfer stack up`, which runs the same
# commands through it). Storage credentials arrive as compose secrets: for each name
# below, NAME_FILE (a file path) becomes NAME (its contents, trailing newline dropped),
# so no credential has to be written into compose's `environment:` where
# `docker inspect` shows it. Tokens need no help: the services read
# ENCINFER_TOKENS_FILE and ENCINFER_KEYSTORE_TOKEN_FILE themselves.
set -eu

FILE_VARS="ENCINFER_S3_ACCESS_KEY ENCINFER_S3_SECRET_KEY ENCINFER_S3_ROOT_USER ENCINFER_S3_ROOT_PASSWORD"

for name in $FILE_VARS; do
    eval "path=\${${name}_FILE:-}"
    if [ -n "$path" ]; then
        if [ ! -r "$path" ]; then
            echo "entrypoint: ${name}_FILE=$path is not a readable file" >&2
            exit 1
        fi
        value=$(cat "$path")
        export "$name=$value"
        unset "${name}_FILE"
    fi
done

exec "$@"
