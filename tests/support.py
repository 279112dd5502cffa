"""Test helpers: the prerequisite guard (a missing prerequisite skips, or fails under CI=true);
turn packed (fused) weights back into a transformers model; a TCP proxy that a test can cut (an S3
endpoint that goes down and comes back).

Torch and the engine are imported where they are used: conftest.py imports this module for the
guard, and a pytest run that only checks the guard should not pay for torch.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

# --- prerequisites: skip outside CI, fail under CI=true ---------------------------------------
#
# A test that needs what a machine may lack (root and network namespaces, Ceph RGW, the ../shared
# data) is marked ``@requires(available, reason)`` (``pytestmark = requires(...)`` for a module), or
# calls ``require(available, reason)`` (a fixture). Outside CI an unmet prerequisite skips with the
# reason; with CI=true it fails with it, so CI cannot go green with a class of tests skipped.
# conftest.py applies the marker (``skip_unmet`` at collection, ``fail_unmet`` before fixtures).
# Hardware or an engine that a machine may simply not have (a CUDA GPU, two GPUs, the Docker engine)
# are plain skips whose reason says so: they stay skips in CI, where no such hardware is promised.

CEPH_TOOLS = ("radosgw", "ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "radosgw-admin")


def in_ci() -> bool:
    """``CI`` is ``true`` or ``1`` (any case), as `.ci/run` and CI services set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def requires(available: bool, reason: str) -> pytest.MarkDecorator:
    """A test needs a prerequisite; ``reason`` completes "CI=true but ...", e.g. "network namespaces
    are unavailable: needs root". Same as ``pytest.mark.requires(available, reason=reason)``."""
    return pytest.mark.requires(bool(available), reason=reason)


def require(available: bool, reason: str) -> None:
    """The function form, for fixtures: returns if ``available``, else skips, or fails under CI."""
    if available:
        return
    if in_ci():
        pytest.fail(ci_failure(reason), pytrace=False)
    pytest.skip(reason)


def ci_failure(reason: str) -> str:
    return f"CI=true but {reason} (a prerequisite CI must have; outside CI this test skips)"


def _unmet(item: pytest.Item) -> list[str]:
    out = []
    for mark in item.iter_markers("requires"):
        available = mark.args[0] if mark.args else mark.kwargs["available"]
        reason = mark.args[1] if len(mark.args) > 1 else mark.kwargs["reason"]
        if not available:
            out.append(reason)
    return out


def skip_unmet(items: Iterable[pytest.Item]) -> None:
    """``pytest_collection_modifyitems``: outside CI an unmet ``requires`` becomes a skip mark (the
    report names the test's line, as ``skipif`` does). Under CI it is left for ``fail_unmet``."""
    if in_ci():
        return
    for item in items:
        if reasons := _unmet(item):
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


def fail_unmet(item: pytest.Item) -> None:
    """``pytest_runtest_setup`` (tryfirst: before any fixture starts): under CI an unmet
    ``requires`` fails the test with its reason."""
    if in_ci() and (reasons := _unmet(item)):
        pytest.fail("; ".join(ci_failure(r) for r in reasons), pytrace=False)


@functools.cache
def netns_prerequisite() -> tuple[bool, str]:
    """Root, iproute2 and a kernel with netns, veth, bridge and htb (``EmulatedCluster.available()``:
    it creates and removes a throwaway namespace, so it is run once per process)."""
    from faascale.pipecast.emulated import EmulatedCluster

    ok, why = EmulatedCluster.available()
    return ok, f"network namespaces are unavailable: {why}"


def ceph_prerequisite() -> tuple[bool, str]:
    """The Ceph tools scripts/ceph-rgw.sh runs, on PATH."""
    missing = [t for t in CEPH_TOOLS if shutil.which(t) is None]
    return not missing, (f"Ceph RGW is not installed (no {', '.join(missing)} on PATH): run "
                         f"scripts/ensure-ceph.sh (needs apt and root)")


def shared_prerequisite(*paths: Path) -> tuple[bool, str]:
    """Files or directories of the shared data (../shared beside the checkout, as in CI)."""
    missing = [p for p in paths if not p.exists()]
    return not missing, "the shared data is absent: no " + ", ".join(str(p) for p in missing)


def hf_model_from_packed(packed: Path):
    """A transformers CausalLM (fp32, eval) holding exactly the packed weights (Hugging Face
    names from ``faascale.engine.hf_export``, the one copy of that mapping)."""
    import transformers

    from faascale.engine.checkpoint import read_manifest
    from faascale.engine.hf_export import hf_state_dict

    m = read_manifest(packed)
    hf_cfg = m.config.to_hf()
    cls = getattr(transformers, m.config.architecture)
    config_cls = getattr(transformers, m.config.architecture.replace("ForCausalLM", "Config"))
    model = cls(config_cls(**hf_cfg)).eval()
    state = {k: v.clone().float() for k, v in hf_state_dict(packed, m).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if m.config.tie_word_embeddings:
        model.tie_weights()
    return model


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target`` (host, port). ``down()`` closes the listener and
    every open connection (the endpoint is then refused, like a dead server); ``up()`` listens
    on the same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        listener.settimeout(0.2)  # accept() is not woken by close() from another thread
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by down()
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FakeClock:
    """An injected clock for pure logic: returns ``now_s``, which the test moves."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s
