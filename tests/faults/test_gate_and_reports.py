"""Faults of the baseline gate and of report writing, performed for real.

Each test builds the bad input a user can meet (a baseline of another model, the report of a
killed run, a claim whose version changed, a SIGTERM mid-run, an output directory that does
not exist) and asserts the refusal or the recovery, never a silent "0 regressions".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import reports
from reports.document import load_report

REPO_ROOT = Path(reports.__file__).resolve().parents[1]
FAST_ARGS = ("-p", "reports.plugin", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
             "-p", "no:anyio", "--hypotheses=hyp.toml")

REGISTRY = """\
registry_version = 1

[[hypothesis]]
id = "GT-HALF"
version = {version}
statement = "The effect is larger than one half."
source = {{ document = "unit-test seed", figure = "d = 0.9" }}
metric = "effect"
comparison = ">"
threshold = 0.5
bound = "lower"
tolerance = 0.1
"""

# The model and the effect come from state.json, so each run can measure something else.
SUITE = """
    import json
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_effect(measure):
        s = json.load(open("state.json"))
        measure.model(s["model"], "fp-" + s["model"], dtype="torch.float32")
        measure.prompts("harmful", "a" * 64, 2)
        measure.check("GT-HALF", s["effect"], ci=(s["effect"] - 0.2, s["effect"] + 0.2))
"""


@pytest.fixture(scope="module", autouse=True)
def _preload_report_dependencies() -> None:
    """Import the HTML stack once: pytester drops modules first imported inside a run."""
    import jinja2  # noqa: F401
    import matplotlib.backends.backend_agg
    import matplotlib.backends.backend_svg
    import matplotlib.figure  # noqa: F401

    import reports.html  # noqa: F401


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester folder with the registry (GT-HALF version 2) and the suite."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    set_registry(pytester.path, version=2)
    (pytester.path / "test_exp.py").write_text(textwrap.dedent(SUITE), encoding="utf-8")
    return pytester


def set_registry(path: Path, version: int) -> None:
    (path / "hyp.toml").write_text(REGISTRY.format(version=version), encoding="utf-8")


def set_state(path: Path, model: str = "tiny-a", effect: float = 0.9, **extra: Any) -> None:
    state = {"model": model, "effect": effect, **extra}
    (path / "state.json").write_text(json.dumps(state), encoding="utf-8")


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest(*FAST_ARGS, *args)


def make_report(project: pytest.Pytester, name: str, *args: str, **state: Any) -> Path:
    """Run the suite with ``state`` and return its JSON report."""
    set_state(project.path, **state)
    path = project.path / name
    result = run(project, f"--report-json={path}", "--report-html=ignored.html", *args)
    assert path.is_file(), result.stdout.str()
    return path


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reports", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )


def edit_report(path: Path, out: Path, change: Any) -> Path:
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    out.write_text(json.dumps(doc), encoding="utf-8")
    load_report(out)  # the edited report is still valid: only its meaning changed
    return out


# -- 1. a baseline of another model -------------------------------------------------------------


def test_compare_refuses_a_baseline_of_another_model(project: pytest.Pytester) -> None:
    old = make_report(project, "a.json", model="tiny-a")
    new = make_report(project, "b.json", model="tiny-b")
    done = run_cli("compare", old, new, cwd=project.path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "share no model fingerprint" in done.stderr
    assert "baseline: tiny-a (fp-tiny-a); current: tiny-b (fp-tiny-b)" in done.stderr
    assert "Compare reports of the same model" in done.stderr
    assert "--update-baseline" in done.stderr
    assert "0 regression(s)" not in done.stdout
    assert "Traceback" not in done.stderr
    assert "3  refused" in run_cli("--help", cwd=project.path).stdout
    assert "3: refused" in run_cli("compare", "--help", cwd=project.path).stdout


def test_pytest_gate_refuses_another_model_until_the_baseline_is_updated(
    project: pytest.Pytester,
) -> None:
    make_report(project, "base.json", model="tiny-a")
    set_state(project.path, model="tiny-b")
    report = project.path / "run.json"
    result = run(project, "--baseline=base.json", f"--report-json={report}",
                 "--report-html=run.html")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str()
    assert "REFUSED: the baseline" in output
    assert "share no model fingerprint" in output
    assert "baseline comparison REFUSED (see above): the run fails." in output
    doc = load_report(report)
    assert doc["exit_status"] == 1
    assert doc["baseline"]["rows"] == []
    assert "share no model fingerprint" in doc["baseline"]["refusals"][0]
    html = (project.path / "run.html").read_text(encoding="utf-8")
    assert "comparison refused" in html
    assert "no regressions" not in html

    accepted = run(project, "--baseline=base.json", "--update-baseline", "--no-report")
    assert accepted.ret == pytest.ExitCode.OK
    assert "accepted: updating the baseline" in accepted.stdout.str()
    assert "baseline updated" in accepted.stdout.str()
    assert run(project, "--baseline=base.json", "--no-report").ret == pytest.ExitCode.OK


# -- 2. the report of a killed run --------------------------------------------------------------


def killed_report(project: pytest.Pytester) -> Path:
    """A real run killed by SIGKILL in its second test: complete false, no exit status."""
    project.makepyfile(test_zz_killed="""
        import os, signal

        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    set_state(project.path, model="tiny-a")
    path = project.path / "killed.json"
    result = project.runpytest_subprocess(*FAST_ARGS, f"--report-json={path}",
                                          "--report-html=ignored.html", timeout=120)
    assert result.ret != 0
    (project.path / "test_zz_killed.py").unlink()
    return path


def test_compare_refuses_the_report_of_a_killed_run(project: pytest.Pytester) -> None:
    killed = killed_report(project)
    doc = load_report(killed)
    assert doc["complete"] is False
    assert doc["exit_status"] is None
    full = make_report(project, "full.json", model="tiny-a")

    done = run_cli("compare", full, killed, cwd=project.path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"the current report {killed} is incomplete" in done.stderr
    assert "did not finish (killed, crashed or still running)" in done.stderr
    assert "only in baseline" not in done.stdout  # no rows: nothing reads as removed

    interrupted = edit_report(full, project.path / "interrupted.json",
                              lambda d: d.update(complete=False, interrupted=True, exit_status=2))
    done = run_cli("compare", interrupted, full, cwd=project.path)
    assert done.returncode == 3
    assert f"the baseline {interrupted} is incomplete: the run was interrupted" in (
        done.stderr)


def test_pytest_refuses_an_incomplete_baseline_before_running(project: pytest.Pytester) -> None:
    killed = killed_report(project)
    result = run(project, f"--baseline={killed}", "--no-report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    error = result.stderr.str()
    assert "--baseline: comparison refused" in error
    assert "is incomplete" in error
    assert "--update-baseline" in error
    # Accepting a new baseline over the incomplete one still works.
    result = run(project, f"--baseline={killed}", "--update-baseline", "--no-report")
    assert result.ret == pytest.ExitCode.OK
    assert load_report(killed)["complete"] is True


# -- 3. a claim whose version changed; notes that are not failures ------------------------------


def test_changed_hypothesis_version_is_not_comparable(project: pytest.Pytester) -> None:
    old = make_report(project, "v2.json")
    set_registry(project.path, version=3)
    new = make_report(project, "v3.json")
    done = run_cli("compare", old, new, cwd=project.path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "not_comparable" in done.stdout
    assert "hypothesis version 2 -> 3: the claim changed" in done.stdout
    assert "1 claim(s) not comparable" in done.stdout
    assert "not comparable: hypothesis version changed for GT-HALF" in done.stderr

    result = run(project, f"--baseline={old}", "--no-report")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "not comparable: hypothesis version changed for GT-HALF" in result.stdout.str()
    assert "the run fails." in result.stdout.str()
    result = run(project, f"--baseline={old}", "--update-baseline", "--no-report")
    assert result.ret == pytest.ExitCode.OK
    assert "(accepted: updating the baseline)" in result.stdout.str()


def test_other_dtype_prompts_and_options_are_notes(project: pytest.Pytester) -> None:
    old = make_report(project, "old.json")

    def change(doc: dict[str, Any]) -> None:
        doc["provenance"]["options"]["profile"] = "quick"
        doc["provenance"]["seed"] = 7
        for model in doc["provenance"]["models"]:
            model["info"]["dtype"] = "torch.bfloat16"
        for prompt_set in doc["provenance"]["prompt_sets"]:
            prompt_set["sha256"] = "f" * 64

    new = edit_report(old, project.path / "new.json", change)
    done = run_cli("compare", old, new, cwd=project.path)
    assert done.returncode == 0, done.stdout + done.stderr
    for part in [
        "option profile: '(not recorded)' in the baseline, 'quick' now",
        "option seed: '(not recorded)' in the baseline, 7 now",
        "dtype float32 in the baseline, bfloat16 now",
        "prompt set 'harmful':",
        "ffffffffffff (n=2) now: the prompts differ",
        "0 regression(s)",
    ]:
        assert part in done.stdout, part


def test_regressions_still_exit_1(project: pytest.Pytester) -> None:
    old = make_report(project, "old.json", effect=0.9)
    new = make_report(project, "new.json", effect=0.4)
    done = run_cli("compare", old, new, cwd=project.path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "REGRESSION flip" in done.stdout


# -- 4. SIGTERM keeps both reports --------------------------------------------------------------


def terminate_mid_test(project: pytest.Pytester) -> tuple[int, str]:
    """Start the suite plus a sleeping test in a subprocess, SIGTERM it while it sleeps."""
    project.makepyfile(test_zz_sleeps="""
        import pathlib, time

        def test_sleeps():
            pathlib.Path("started").write_text("")
            time.sleep(120)
    """)
    set_state(project.path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *FAST_ARGS, "-p", "pytester",
         "--report-json=out.json", "--report-html=out.html"],
        cwd=project.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (project.path / "started").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the sleeping test never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output


def assert_interrupted_reports(path: Path) -> None:
    doc = load_report(path / "out.json")
    assert doc["interrupted"] is True
    assert doc["complete"] is False
    assert doc["exit_status"] == 128 + signal.SIGTERM
    assert [t["nodeid"] for t in doc["tests"]] == ["test_exp.py::test_effect"]
    html = (path / "out.html").read_text(encoding="utf-8")
    assert "This run did not finish (interrupted)" in html
    assert "GT-HALF" in html


def test_sigterm_writes_both_reports_marked_interrupted(project: pytest.Pytester) -> None:
    returncode, output = terminate_mid_test(project)
    assert returncode == -signal.SIGTERM, output  # then ends by the signal, as by default
    assert "SIGTERM received, run interrupted" in output
    assert "HTML report (interrupted):" in output
    assert_interrupted_reports(project.path)


def test_sigterm_hands_over_to_the_previous_handler(project: pytest.Pytester) -> None:
    project.makeconftest("""
        import os, pathlib, signal

        def on_term(signum, frame):
            pathlib.Path("previous-handler-ran").write_text(str(signum))
            os._exit(7)

        def pytest_configure(config):
            signal.signal(signal.SIGTERM, on_term)
    """)
    returncode, output = terminate_mid_test(project)
    assert returncode == 7, output
    assert (project.path / "previous-handler-ran").read_text() == str(int(signal.SIGTERM))
    assert_interrupted_reports(project.path)


def test_sigterm_handler_is_restored_after_a_run(project: pytest.Pytester) -> None:
    before = signal.getsignal(signal.SIGTERM)
    set_state(project.path)
    assert run(project, "--report-json=r.json", "--report-html=r.html").ret == 0
    assert signal.getsignal(signal.SIGTERM) == before


# -- 5. render into a directory that does not exist ---------------------------------------------


def test_render_refuses_a_missing_output_directory(project: pytest.Pytester) -> None:
    report = make_report(project, "a.json")
    out = project.path / "some" / "missing" / "dir" / "out.html"
    done = run_cli("render", report, "-o", out, cwd=project.path)
    assert done.returncode == 2
    assert f"output directory {out.parent} is not an existing directory" in done.stderr
    assert "create it first" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project.path / "some").exists()


# -- a new model version gated on purpose against its predecessor's baseline --------------------

# Model-parametrised like the experiments: the node id carries the model's test id.
PARAM_SUITE = """
    import json
    import pytest

    S = json.load(open("state.json"))

    @pytest.mark.claim("GT-HALF")
    @pytest.mark.parametrize("model", [S["model"]], ids=[S["model"] + "-L03"])
    def test_effect(measure, model):
        measure.model(model, "fp-" + model, dtype="torch.float32", test_id=model)
        measure.prompts("harmful", "a" * 64, 2)
        measure.check("GT-HALF", S["effect"], ci=(S["effect"] - 0.2, S["effect"] + 0.2))
"""


def test_allow_model_change_matches_rows_of_the_new_model(project: pytest.Pytester) -> None:
    (project.path / "test_exp.py").write_text(textwrap.dedent(PARAM_SUITE), encoding="utf-8")
    old = make_report(project, "v1.json", model="cand-v1")
    same = make_report(project, "v2.json", model="cand-v2")
    worse = make_report(project, "v2-worse.json", model="cand-v2", effect=0.3)

    refused = run_cli("compare", old, same, cwd=project.path)
    assert refused.returncode == 3 and "--allow-model-change" in refused.stderr

    ok = run_cli("compare", old, same, "--allow-model-change", cwd=project.path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "model changed on purpose: baseline cand-v1" in ok.stdout
    assert "0 regression(s)" in ok.stdout and "1 unchanged result(s)" in ok.stdout

    flipped = run_cli("compare", old, worse, "--allow-model-change", cwd=project.path)
    assert flipped.returncode == 1, flipped.stdout + flipped.stderr
    assert "REGRESSION flip" in flipped.stdout and "test_effect[cand-v2-L03]" in flipped.stdout

    set_state(project.path, model="cand-v2", effect=0.3)
    gated = run(project, "--baseline=v1.json", "--allow-model-change", "--no-report")
    assert gated.ret == pytest.ExitCode.TESTS_FAILED
    assert "REGRESSION" in gated.stdout.str()


def test_allow_model_change_refuses_reports_of_several_models(project: pytest.Pytester) -> None:
    old = make_report(project, "a.json", model="tiny-a")
    both = edit_report(old, project.path / "two.json", lambda doc: doc["provenance"][
        "models"].append({**doc["provenance"]["models"][0], "name": "x", "fingerprint": "fp-x"}))
    new = make_report(project, "b.json", model="tiny-b")
    done = run_cli("compare", both, new, "--allow-model-change", cwd=project.path)
    assert done.returncode == 3
    assert "compares one model with one model" in done.stderr and "holds 2" in done.stderr
    usage = run(project, "--allow-model-change", "--no-report")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    assert "--allow-model-change needs --baseline" in usage.stderr.str()
