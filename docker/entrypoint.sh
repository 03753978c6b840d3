#!/bin/sh
# `export ARGS` runs rmt-export, `run ARGS` runs rmt-run; anything else runs as given.
set -e
case "$1" in
    export) shift; exec rmt-export "$@" ;;
    run) shift; exec rmt-run "$@" ;;
    *) exec "$@" ;;
esac
