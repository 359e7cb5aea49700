"""benchmarks/gpu_check.py, the GPU acceptance check: its tiny CPU run executes every section (a..i) and passes,
the checks that need CUDA read 'not measured' instead of failing, the report and the JSON carry the device and
version fields; a section that raises or fails a check fails the run (exit code 1) without stopping the others;
an unknown section is refused."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
gpu_check = load_script(SCRIPT, "gpu_check")

pytestmark = pytest.mark.usefixtures("one_thread")

OK_STATES = {"pass", "not_measured", "not_applicable"}
# the checks of a CPU run that need CUDA: they must be recorded as not measured, never as passed or failed
CUDA_ONLY = {
    "b": ["peak memory under 12 GB"],
    "c": ["device forward agrees with CPU"],
    "e": ["host synchronisations (set_sync_debug_mode)"],
    "f": ["sparse-learning step cost / plain <= 1.5"],
}


@pytest.mark.slow
def test_tiny_cpu_run_executes_every_section_and_writes_the_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[gpu_check] ")]
    for key in "abcdefghi":  # a start line and a result line per section
        assert any(line.startswith(f"[gpu_check] {key}: PASS in ") for line in progress), (key, progress)

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env_fields = report["environment"]
    assert env_fields["device"]["type"] == "cpu" and env_fields["device"]["name"]
    assert {"torch", "cuda", "cudnn", "python", "torch_geometric", "torch_pruning"} <= set(env_fields["versions"])
    assert env_fields["versions"]["torch"].split("+")[0] == gpu_check.torch.__version__.split("+")[0]
    assert env_fields["date"]
    assert report["passed"] is True and report["sizes"]["tiny"] is True

    sections = {s["key"]: s for s in report["sections"]}
    assert list(sections) == list("abcdefghi")
    for key, s in sections.items():
        assert s["status"] == "pass" and s["error"] is None, (key, s)
        assert s["checks"] and all(c["status"] in OK_STATES for c in s["checks"]), (key, s["checks"])
        assert any(c["status"] == "pass" for c in s["checks"]), key  # every section checked something
    for key, names in CUDA_ONLY.items():
        states = {c["name"]: c["status"] for c in sections[key]["checks"]}
        for name in names:
            assert states[name] == "not_measured", (key, name, states)
    # the numbers each section exists for
    assert sections["a"]["numbers"]["vgg19 channels_last"]["tensors"] > 0
    assert sections["b"]["numbers"]["fwd_bwd_median_s"] > 0
    assert sections["c"]["numbers"]["unfused vs fused"]["grad_cosine"] > 0.999
    assert sections["e"]["numbers"]["host_sync_proxy_total"] >= 1
    assert all(sections["f"]["numbers"][v]["images_per_s"] > 0
               for v in ("fp32", "amp", "amp+channels_last", "amp+sparse_learning"))
    assert sections["f"]["numbers"]["sparse_over_plain_step_cost"] > 0
    assert sections["g"]["numbers"]["speed_up_device"] >= 2.3
    assert sections["h"]["numbers"]["backend"] == "gloo"
    assert {"K=1", "K=2"} <= set(sections["i"]["numbers"]) and "verdict" in sections["i"]["numbers"]

    text = (tmp_path / "report.md").read_text()
    assert "NOT the GPU acceptance" in text and "torch " in text and "cuDNN" in text
    for key in "abcdefghi":
        assert f"## {key}. " in text
    assert "cpu: not measured" in text


def _failing(_ctx, _sec):
    raise RuntimeError("boom in a section")


def _failed_check(_ctx, sec):
    sec.check("a check that fails", False, "on purpose")


def test_a_failing_section_fails_the_run_without_stopping_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # main() sets it if unset; restored after the test
    monkeypatch.setitem(gpu_check.SECTIONS, "a", ("raises", _failing))
    monkeypatch.setitem(gpu_check.SECTIONS, "b", ("fails a check", _failed_check))
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--sections", "a,b,g", "--out", str(tmp_path)])
    assert rc == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = {s["key"]: s for s in report["sections"]}
    assert report["passed"] is False
    assert sections["a"]["status"] == "fail" and "boom in a section" in sections["a"]["error"]
    assert sections["b"]["status"] == "fail" and sections["b"]["error"] is None
    assert sections["g"]["status"] == "pass"  # ran after the failures
    text = (tmp_path / "report.md").read_text()
    assert "boom in a section" in text and "| a check that fails | FAIL | on purpose |" in text


def test_an_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.parse_args(["--sections", "a,z"])
    assert err.value.code == 2 and "unknown section" in capsys.readouterr().err
