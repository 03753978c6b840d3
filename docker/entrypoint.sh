#!/bin/sh
# `export ARGS` runs rmt-export, `run ARGS` rmt-run, `compare ARGS` rmt-compare; anything
# else runs as given.
set -e
case "$1" in
    export) shift; exec rmt-export "$@" ;;
    run) shift; exec rmt-run "$@" ;;
    compare) shift; exec rmt-compare "$@" ;;
    *) exec "$@" ;;
esac
