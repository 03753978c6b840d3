"""A hostile home for the backend-choice cache: ill-typed or corrupt cache files, a
read-only, empty or missing HOME. The run measures (or goes on without the cache) and
exits 0; nothing lands in TMPDIR (torch's compiler cache included) (harness:
tests/hostile/harness.py)."""

from __future__ import annotations

import json

import pytest
from harness import Case, build_assets, run_case

from rmt_deploy.manifest import read_manifest
from rmt_deploy.runtime import selection
from rmt_deploy.runtime.options import RuntimeOptions

GOOD = {"backend": "onnxruntime", "reason": "measured on this host", "threads": 1,
        "timings": {"onnxruntime 1 thread": 1.0}}


@pytest.fixture(scope="module")
def assets(encoder_checkpoint, encoder_export, tmp_path_factory):
    return build_assets(encoder_checkpoint, encoder_export, tmp_path_factory.mktemp("assets"))


def _measuring(scene) -> dict[str, str | None]:
    return {"RMT_DEPLOY_MEASURE": None, "RMT_DEPLOY_CACHE_DIR": None, "XDG_CACHE_HOME": None}


def _cached(content: bytes):
    """rmt-run on an export whose cache entry in HOME holds ``content``."""
    def prepare(scene):
        export = scene.export()
        path = selection.cache_file(read_manifest(export), RuntimeOptions(),
                                    scene.home / ".cache" / "rmt-deploy")
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        return [export, scene.text(), "--json"]
    return prepare


def _read_only_home(scene) -> dict[str, str | None]:
    (scene.home / ".cache").write_text("")  # no cache folder can be made, not even by root
    scene.home.chmod(0o555)
    return _measuring(scene)


def _run(scene):
    return [scene.export(), scene.text(), "--json"]


def _run_checkpoint(scene):
    return [scene.checkpoint(), scene.text(), "--json"]


def _export(scene):
    return [scene.checkpoint(), "-o", "out", "--validation-segments", "2", "--quiet"]


def _typed(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


CASES = [
    Case("cache-threads-a-string", "rmt-run", _cached(_typed(threads="2")), code=0,
         env=_measuring),
    Case("cache-timings-fast", "rmt-run", _cached(_typed(timings="fast")), code=0,
         env=_measuring),
    Case("cache-backend-unknown", "rmt-run", _cached(_typed(backend="tensorrt")), code=0,
         env=_measuring),
    Case("cache-not-json", "rmt-run", _cached(b"\xff\xfe{not json"), code=0, env=_measuring),
    Case("cache-deeply-nested", "rmt-run", _cached(b"[" * 100_000), code=0, env=_measuring),
    Case("home-read-only-run", "rmt-run", _run, code=0, env=_read_only_home),
    Case("home-read-only-checkpoint", "rmt-run", _run_checkpoint, code=0,
         env=_read_only_home),
    Case("home-read-only-export", "rmt-export", _export, code=0, env=_read_only_home),
    Case("home-empty", "rmt-run", _run, code=0,
         env=lambda scene: {**_measuring(scene), "HOME": ""}),
    Case("home-unset", "rmt-run", _run_checkpoint, code=0,
         env=lambda scene: {**_measuring(scene), "HOME": None}),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_cache(case, assets, tmp_path):
    try:
        run_case(case, tmp_path, assets)
    finally:
        if (tmp_path / "home").exists():
            (tmp_path / "home").chmod(0o755)
