"""Test helpers: turn packed (fused) weights back into a transformers model; a TCP proxy that
a test can cut (an S3 endpoint that goes down and comes back)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from faascale.engine.checkpoint import load_block, read_manifest
from faascale.engine.config import ModelConfig
from faascale.engine.model import merge_block_tensors


def unfuse_to_hf(cfg: ModelConfig, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused block tensors -> Hugging Face names (q/k/v and gate/up split again)."""
    sd = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["norm.weight"]}
    if "lm_head.weight" in w:
        sd["lm_head.weight"] = w["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        sd[p + "input_layernorm.weight"] = w[q + "input_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = w[q + "post_norm.weight"]
        for kind in ("weight", "bias"):
            if q + f"qkv.{kind}" in w:
                qw, kw, vw = w[q + f"qkv.{kind}"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
                sd[p + f"self_attn.q_proj.{kind}"] = qw
                sd[p + f"self_attn.k_proj.{kind}"] = kw
                sd[p + f"self_attn.v_proj.{kind}"] = vw
            if q + f"o.{kind}" in w:
                sd[p + f"self_attn.o_proj.{kind}"] = w[q + f"o.{kind}"]
            if q + f"gate_up.{kind}" in w:
                g, u = w[q + f"gate_up.{kind}"].chunk(2)
                sd[p + f"mlp.gate_proj.{kind}"] = g
                sd[p + f"mlp.up_proj.{kind}"] = u
            if q + f"down.{kind}" in w:
                sd[p + f"mlp.down_proj.{kind}"] = w[q + f"down.{kind}"]
    return {k: v.clone().float() for k, v in sd.items()}


def hf_model_from_packed(packed: Path):
    """A transformers CausalLM (fp32, eval) holding exactly the packed weights."""
    import transformers

    m = read_manifest(packed)
    weights = merge_block_tensors([load_block(packed, m, i) for i in range(m.num_blocks)])
    hf_cfg = m.config.to_hf()
    cls = getattr(transformers, m.config.architecture)
    config_cls = getattr(transformers, m.config.architecture.replace("ForCausalLM", "Config"))
    model = cls(config_cls(**hf_cfg)).eval()
    missing, unexpected = model.load_state_dict(unfuse_to_hf(m.config, weights), strict=False)
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
