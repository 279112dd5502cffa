"""``faascale coldstart profile-vllm``: the start/stop module against a fake API server (a script in
vLLM's place that replays a real log, serves ``/health`` and leaves a child in its process group),
the data rows and folder (read back by ``load_dataset`` and ``predict``), the CLI's errors, and
once for real: one eager vLLM start of SmolLM2 (slow; fails under CI=true without ``.venv-vllm``)."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from faascale.coldstart.dataset import load_dataset
from faascale.coldstart.vllm_data import (MODEL_COLUMNS, RUN_COLUMNS, add_runs, model_row,
                                          next_run_index, run_row)
from faascale.coldstart.vllm_log import parse_vllm_log
from faascale.coldstart.vllm_run import (VllmRun, VllmRunError, VllmServerConfig, port_is_free,
                                         process_alive, resolve_python, run_vllm_start,
                                         server_command, server_env)
from support import requires

ROOT = Path(__file__).resolve().parents[1]
LOGS = Path(__file__).parent / "data" / "vllm_logs"
COMPILED = LOGS / "cpu-0.32-api-compiled-aot-miss.log"
EAGER = LOGS / "cpu-0.32-api-eager.log"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
HAVE_VLLM = VLLM_PYTHON.is_file() and any(VLLM_PYTHON.parents[1].glob(".installed-*"))
MACHINE = {"hostname": "testhost", "cpu_model": "Test CPU", "gpu": None}

FAKE = '''#!{python}
import http.server, os, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
    f.write(" ".join(args) + "\\n" + os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") + "\\n")
child = subprocess.Popen(["sleep", "300"])  # an engine core in the same process group
with open(os.environ["FAKE_VLLM_RECORD"], "a") as f:
    f.write(str(child.pid) + "\\n")
mode = os.environ.get("FAKE_VLLM_MODE", "serve")
for line in open(os.environ["FAKE_VLLM_LOG"]):
    sys.stdout.write(line)
    sys.stdout.flush()
    if "Starting vLLM server on" in line:
        break
if mode == "exit":
    sys.exit(3)
if mode == "hang":
    time.sleep(300)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
'''



@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE.replace("{python}", sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "record.txt"))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(COMPILED))
    return path


def _record(tmp_path: Path) -> tuple[str, str, int]:
    args, kv, pid = (tmp_path / "record.txt").read_text().splitlines()[:3]
    return args, kv, int(pid)


def test_start_until_ready_then_the_whole_group_stops(fake_python: Path, tmp_path: Path) -> None:
    cfg = VllmServerConfig(model_dir="/models/m", python=str(fake_python), enforce_eager=True,
                           kv_cache_gib=2)
    steps: list[str] = []
    run = run_vllm_start(cfg, tmp_path / "logs" / "run1.log", timeout_s=30, poll_s=0.05,
                         stop_timeout_s=5, on_step=steps.append)
    assert run.ok, run.error
    assert run.measured_s is not None and 0 < run.measured_s < 30
    args, kv, child = _record(tmp_path)
    assert "--enforce-eager" in args and f"--port {run.port}" in args and kv == "2"
    assert not process_alive(child), "the engine-core stand-in outlived the stop"
    assert port_is_free("127.0.0.1", run.port)
    text = COMPILED.read_text()
    replayed = text[:text.index("\n", text.index("Starting vLLM server on")) + 1]
    assert run.log_path.read_text() == replayed
    assert run.startup == parse_vllm_log(replayed)
    assert steps[-1] == "ready" and set(steps) <= {"starting", "bootstrap", "model_loading",
                                                   "torch_compile", "kv_cache", "vllm_other", "ready"}


@pytest.mark.parametrize("mode,why", [("exit", "exited with status 3"), ("hang", "not ready within")])
def test_failed_starts_say_why_with_the_logs_end(fake_python: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, mode: str,
                                                 why: str) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    cfg = VllmServerConfig(model_dir="/models/m", python=str(fake_python))
    run = run_vllm_start(cfg, tmp_path / "run.log", timeout_s=1.5, poll_s=0.05, stop_timeout_s=5)
    assert not run.ok and run.ready_at_s is None
    assert why in (run.error or "") and "Starting vLLM server on" in (run.error or "")
    assert not process_alive(_record(tmp_path)[2])


def test_a_taken_port_and_a_missing_interpreter_are_typed(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = VllmServerConfig(model_dir="/m", python=sys.executable, port=s.getsockname()[1])
        with pytest.raises(VllmRunError, match="in use"):
            run_vllm_start(cfg, tmp_path / "x.log")
    with pytest.raises(VllmRunError, match="make vllm-env"):
        resolve_python(str(tmp_path / "nope"))
    with pytest.raises(VllmRunError, match="FAASCALE_VLLM_PYTHON.*make vllm-env"):
        resolve_python(None, env={"FAASCALE_VLLM_PYTHON": str(tmp_path / "nope")})
    with pytest.raises(VllmRunError, match=re.escape(str(tmp_path / ".venv-vllm"))):
        resolve_python(None, env={}, cwd=tmp_path)
    venv_python = tmp_path / ".venv-vllm" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)
    assert resolve_python(None, env={}, cwd=tmp_path) == venv_python
    with pytest.raises(VllmRunError):
        VllmServerConfig(model_dir="/m", python="p", port=70000)


def test_command_and_environment() -> None:
    cfg = VllmServerConfig(model_dir="/m", python="/py", dtype="bfloat16", max_model_len=4096,
                           threads_bind="0-3", extra_args=("--seed", "1"))
    assert server_command(cfg, 8001) == [
        "/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--host", "127.0.0.1",
        "--port", "8001", "--dtype", "bfloat16", "--max-model-len", "4096", "--seed", "1"]
    env = server_env(cfg, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": "0-3"}
    assert server_env(VllmServerConfig(model_dir="/m", python="/py"), {})["VLLM_CPU_OMP_THREADS_BIND"]


def _hf_dir(path: Path) -> Path:
    """A Hugging Face folder with a hand-written safetensors header (two fp32 tensors)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 8, "intermediate_size": 16, "vocab_size": 10}))
    header = {"a": {"dtype": "F32", "shape": [10, 8], "data_offsets": [0, 320]},
              "b": {"dtype": "F32", "shape": [8], "data_offsets": [320, 352]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(352))
    (path / "tokenizer.json").write_bytes(b"x" * 2_500_000)
    return path


def test_model_row_from_a_hugging_face_folder(tmp_path: Path) -> None:
    row = model_row(_hf_dir(tmp_path / "tiny"))
    assert tuple(row) == MODEL_COLUMNS
    assert row["model"] == "tiny" and float(row["size_b_params"]) == pytest.approx(88 / 1e9)
    assert row["weight_bytes"] == "352" and row["tokenizer_size_mb"] == "2.5"
    assert (row["layers"], row["num_key_value_heads"], row["ffn_dim"]) == ("2", "2", "16")


def _run(log: Path, measured_s: float) -> VllmRun:
    return VllmRun(log_path=log, port=1, launched_at_s=1000.0, ready_at_s=1000.0 + measured_s,
                   startup=parse_vllm_log(log.read_text()), returncode=0)


def test_run_rows_add_up_to_the_measured_start() -> None:
    compiled = _run(COMPILED, 104.25)
    st = compiled.startup
    row = run_row(compiled, model="m", scenario="testhost_compiled", run_index=1, eager=False,
                  machine=MACHINE)
    assert tuple(row) == RUN_COLUMNS
    assert float(row["graph_compile_general_shape"]) == pytest.approx(st.steps_s["torch_compile"])
    assert row["graph_compile_cached"] == "" and row["compile_cache_observed"] == "miss"
    assert float(row["kv_cache_profiling"]) == st.steps_s["kv_cache"]
    assert float(row["load_weights"]) + float(row["model_init"]) == pytest.approx(
        st.steps_s["model_loading"])
    # bootstrap takes what no step covers: the steps add up to spawn → ready
    rest = 104.25 - sum(st.steps_s.values())
    assert float(row["framework_bootstrap"]) == pytest.approx(st.steps_s["bootstrap"] + rest, abs=1e-4)
    assert float(row["total_time"]) == pytest.approx(104.25) == float(row["actual_total_time"])
    eager = run_row(_run(EAGER, 38.15), model="m", scenario="s", run_index=2, eager=True,
                    machine=MACHINE)
    assert eager["compile_cache_observed"] == "none" and eager["torch.compile"] == ""
    assert eager["graph_compile_general_shape"] == eager["graph_compile_cached"] == ""
    # a parse that outruns the measured interval keeps its bootstrap
    short = run_row(_run(EAGER, 5.0), model="m", scenario="s", run_index=3, eager=True,
                    machine=MACHINE)
    assert float(short["framework_bootstrap"]) == _run(EAGER, 5.0).startup.steps_s["bootstrap"]
    with pytest.raises(ValueError):
        run_row(VllmRun(COMPILED, 1, 0.0, None, None, None, "boom"), model="m", scenario="s",
                run_index=1, eager=False, machine=MACHINE)


def test_data_folder_grows_and_predict_reads_it(tmp_path: Path) -> None:
    from faascale.coldstart.predict import predict_file

    out = tmp_path / "data"
    model = model_row(_hf_dir(tmp_path / "tiny"))
    rows = [run_row(_run(COMPILED, t), model="tiny", scenario="testhost_compiled", run_index=i + 1,
                    eager=False, machine=MACHINE) for i, t in enumerate((104.0, 106.0))]
    add_runs(out, model, rows)
    assert next_run_index(out, "tiny", "testhost_compiled") == 3
    more = [run_row(_run(EAGER, 38.0), model="tiny", scenario="testhost_eager", run_index=1,
                    eager=True, machine=MACHINE),
            run_row(_run(COMPILED, 108.0), model="tiny", scenario="testhost_compiled", run_index=3,
                    eager=False, machine=MACHINE)]
    all_rows = add_runs(out, model, more)
    with (out / "startup_runs.csv").open() as f:
        assert list(csv.DictReader(f)) == all_rows
    means = {r["scenario"]: r for r in all_rows if r["run"] == "mean"}
    assert len(means) == 2 and len(all_rows) == 6
    assert float(means["testhost_compiled"]["actual_total_time"]) == pytest.approx(106.0)
    assert float(means["testhost_compiled"]["total_time"]) == pytest.approx(106.0)
    ds = load_dataset(out)
    assert set(ds.models) == {"tiny"} and len(ds.observations) == 2
    assert ds.settings["testhost_compiled"].compile_cache == "miss"
    assert ds.settings["testhost_eager"].compile_cache == "none"
    features = tmp_path / "features.csv"
    features.write_text(",".join([*MODEL_COLUMNS, "machine"]) + "\n"
                        + ",".join([*(model[c] for c in MODEL_COLUMNS), "testhost_compiled"]) + "\n")
    pred = predict_file(out, features, tmp_path / "pred.csv")
    assert pred[0].total_s == pytest.approx(106.0, rel=0.05)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faascale.cli", "coldstart", "profile-vllm", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_cli_without_a_vllm_interpreter_tells_to_make_it(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "tiny")
    out = _cli(str(hf), "--runs", "1", "--out", str(tmp_path / "o"),
               env={"FAASCALE_VLLM_PYTHON": str(tmp_path / "missing" / "python")})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "make vllm-env" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "o").exists()


def test_cli_with_a_fake_server_writes_the_data_folder(fake_python: Path, tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "tiny")
    out = tmp_path / "o"
    res = _cli(str(hf), "--runs", "2", "--out", str(out), "--python", str(fake_python),
               "--timeout-s", "30", "--scenario", "fake_compiled")
    assert res.returncode == 0, res.stderr
    assert "added 2 run(s) of tiny (fake_compiled)" in res.stdout
    ds = load_dataset(out)
    assert len(ds.observations) == 1 and ds.observations[0].setting.setting == "fake_compiled"
    for k in (1, 2):
        saved = json.loads((out / "logs" / f"tiny_fake_compiled_run{k}.json").read_text())
        assert saved["startup"]["flags"] == ["aot_cache_miss"]
        spans = saved["profile"]["spans"]
        assert spans[-1]["name"] == "vllm_other"
        # the replay is instant: the log's ~94 s are scaled into the measured interval
        assert spans[0]["attrs"]["scaled_by"] < 0.1
    failed = _cli(str(hf), "--runs", "1", "--out", str(out), "--python", str(fake_python),
                  "--timeout-s", "30", "--scenario", "fake_compiled", env={"FAKE_VLLM_MODE": "exit"})
    assert failed.returncode == 2 and "exited with status 3" in failed.stderr


@pytest.mark.slow
@requires(HAVE_VLLM, f"missing .venv-vllm ({VLLM_PYTHON}): run make vllm-env")
def test_one_real_eager_vllm_start(smollm2_packed: Path, tmp_path: Path) -> None:
    """One real ``--enforce-eager`` start of SmolLM2 through the CLI: the log parsed into the steps
    its own lines state, the folder read by ``load_dataset``, no vLLM process left."""
    from faascale.engine.hf_export import exported_hf_dir
    from faascale.engine.sources import faascale_home

    hf = exported_hf_dir(smollm2_packed, faascale_home() / "hf", dtype="float32")
    out = tmp_path / "data"
    ipc_before = _ipc_leftovers()
    res = _cli(str(hf), "--runs", "1", "--enforce-eager", "--out", str(out), "--python",
               str(VLLM_PYTHON), "--timeout-s", "400", "--model-name", "smollm2", timeout=480)
    assert res.returncode == 0, res.stdout + res.stderr
    log = next((out / "logs").glob("smollm2_*_eager_run1.log"))
    text = log.read_text()
    saved = json.loads(log.with_suffix(".json").read_text())
    steps = saved["startup"]["steps_s"]
    assert set(steps) == {"bootstrap", "model_loading", "kv_cache"}
    stated = [float(re.search(p, text).group(1)) for p in (
        r"Initializing model took ([\d.]+) seconds", r"Loading weights took ([\d.]+) seconds",
        r"warmup model\) took ([\d.]+) s")]
    assert steps["model_loading"] == pytest.approx(stated[0] + stated[1])
    assert steps["kv_cache"] == stated[2]
    assert saved["startup"]["compile_cache"] == "none" and saved["startup"]["warnings"] == []
    assert 0 < saved["startup"]["total_s"] <= saved["measured_s"] < 400
    ds = load_dataset(out)
    assert [o.model.name for o in ds.observations] == ["smollm2"]
    for pid in {int(p) for p in re.findall(r"pid=(\d+)\)", text)}:
        assert not process_alive(pid), f"vLLM process {pid} outlived the run"
    # vLLM's IPC sockets went to the server's own directory, removed with it (not into /tmp)
    assert _ipc_leftovers() <= ipc_before, _ipc_leftovers() - ipc_before


def _ipc_leftovers() -> set[str]:
    """Sockets and our vLLM IPC directories directly in the temp dir."""
    tmp = Path(tempfile.gettempdir())
    return {p.name for p in tmp.iterdir()
            if p.is_socket() or p.name.startswith("faascale-vllm-ipc-")}


def test_profile_loop_labels_disk_and_cold_compile_caches(fake_python: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``vllm_profile.profile_vllm`` (the CLI's loop): a ``disk`` start drops the folder's pages
    first and is labelled so; a ``cold`` start gets a fresh cache root holding only the shared
    model infos and its own Inductor cache, removed afterwards; runs number on."""
    from faascale.coldstart import vllm_profile
    from faascale.coldstart.vllm_profile import ProfileRequest, cold_caches, profile_vllm

    hf = _hf_dir(tmp_path / "tiny")
    shared = tmp_path / "vllm-cache"
    (shared / "modelinfos").mkdir(parents=True)
    (shared / "modelinfos" / "x-LlamaForCausalLM.json").write_text("{}")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(shared))
    evicted: list[list[Path]] = []
    monkeypatch.setattr(vllm_profile, "evict_from_page_cache", evicted.append)
    out = tmp_path / "o"
    lines: list[str] = []
    base = dict(model_dir=str(hf), out=str(out), python=str(fake_python), timeout_s=30.0)
    res = profile_vllm(ProfileRequest(**base, weights_source="disk", enforce_eager=True,
                                      scenario="fake_eager_disk"), MACHINE, echo=lines.append,
                       report=lines.append)
    assert res.failure is None and len(res.runs) == 1 and res.scenario == "fake_eager_disk"
    assert [p.name for p in evicted[0]] == ["config.json", "model.safetensors", "tokenizer.json"]
    res = profile_vllm(ProfileRequest(**base, runs=2, compile_cache="cold"), MACHINE,
                       echo=lines.append, report=lines.append)
    assert res.scenario == "testhost_compiled" and len(res.runs) == 2 and len(evicted) == 1
    with (out / "startup_runs.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["run"] != "mean"]
    assert [(r["scenario"], r["run"], r["weights_source"]) for r in rows] == [
        ("fake_eager_disk", "1", "disk"), ("testhost_compiled", "1", "pagecache"),
        ("testhost_compiled", "2", "pagecache")]
    assert "compile-cache_cold" in rows[1]["variant"] and rows[1]["compile_cache_setting"].startswith("cold")
    assert f"added 2 run(s) of tiny (testhost_compiled) to {out}" in lines
    cfg = VllmServerConfig(model_dir=str(hf), python=str(fake_python))
    with cold_caches(cfg) as cold:
        root = Path(cold.cache_root or "")
        assert (root / "modelinfos" / "x-LlamaForCausalLM.json").is_file()
        env = server_env(cold, {})
        assert env["VLLM_CACHE_ROOT"] == str(root)
        assert env["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor")
    assert not root.exists()
    with pytest.raises(ValueError, match="weights_source"):
        ProfileRequest(**base, weights_source="s3")
    with pytest.raises(ValueError, match="compile_cache"):
        ProfileRequest(**base, compile_cache="warm")
