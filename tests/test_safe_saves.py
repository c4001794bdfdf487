"""Saves never remove or replace what they did not create: a target that appears during a save survives, of
two concurrent saves exactly one wins, SIGTERM cleans up, leftovers of killed saves are removed next time,
results get the user's umask. Evaluation runs never touch an earlier run's files, and stop on Ctrl-C / SIGTERM
with exit 130 / 143 under Lightning, keeping what a resumed comparison needs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kn_edit
from helpers import PASSAGES, ValueVectorEditor, file_tree, tiny_config, tiny_facts, write_capital_facts
from kn_edit import EditError, Neuron
from kn_edit.cli import main
from kn_edit.storage.atomic import atomic_dir, atomic_file, check_writable, rename_noreplace
from tiny_models import build_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))


# ----- in process -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", [False, True], ids=["folder-with-a-file", "empty-folder"])
def test_a_folder_created_at_the_target_during_a_save_survives(tmp_path, empty):
    target = tmp_path / "victim"
    with pytest.raises(EditError, match="appeared while the folder was being saved") as info:
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"new model")
            target.mkdir()  # the user, or another kn-edit, meanwhile
            if not empty:
                (target / "notes.txt").write_text("mine")
    assert target.is_dir() and [p.name for p in target.iterdir()] == ([] if empty else ["notes.txt"])
    if not empty:
        assert (target / "notes.txt").read_text() == "mine"
    kept = Path(str(info.value).split("the finished folder is at ")[1].split(" (move it")[0])
    assert kept.parent == tmp_path and not kept.name.startswith(".")  # not mistaken for a leftover later
    assert (kept / "weights.bin").read_bytes() == b"new model"
    assert partials(tmp_path) == []


def test_a_file_created_at_the_target_during_a_save_survives(tmp_path):
    target = tmp_path / "edit.safetensors"
    with pytest.raises(EditError, match="appeared while") as info:
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"patch")
            target.write_text("mine")
    assert target.read_text() == "mine"
    assert "edit.safetensors." in str(info.value) and partials(tmp_path) == []


def test_save_model_keeps_what_appeared_at_its_target(tmp_path, monkeypatch):
    model, tok = build_model("llama")
    km = kn_edit.wrap(model, tok, name="tiny")
    target = tmp_path / "victim"
    real = type(km.model).save_pretrained

    def save_and_race(self, path, *a, **kw):
        real(self, path, *a, **kw)
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    monkeypatch.setattr(type(km.model), "save_pretrained", save_and_race)
    with pytest.raises(EditError, match=r"victim appeared while the model was being saved.*the finished model is at"):
        km.save(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_rename_noreplace_refuses_an_empty_folder(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr("kn_edit.storage.atomic._RENAMEAT2", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    (tmp_path / "f").write_text("x")
    (tmp_path / "g").write_text("y")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "y"
    rename_noreplace(tmp_path / "f", tmp_path / "h")
    assert (tmp_path / "h").read_text() == "x" and not (tmp_path / "f").exists()
    (tmp_path / "a" / "inside").write_text("z")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c" / "inside").read_text() == "z" and (tmp_path / "b").is_dir()


KILLED = r"""
import os, signal, sys
from pathlib import Path
from kn_edit.storage.atomic import atomic_dir, atomic_file

here = Path(sys.argv[1])
with atomic_dir(here / "model") as d, atomic_file(here / "p.safetensors") as f:
    (d / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    f.write_bytes(b"\0" * 10)
    os.kill(os.getpid(), signal.SIGKILL)  # nothing can clean up
"""


def _killed_saves(folder: Path) -> list[Path]:
    """The leftovers of a folder save and a file save killed midway, exactly as kn-edit leaves them."""
    before = partials(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(folder)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p for p in partials(folder) if p not in before]
    assert len(left) == 2 and all((p / ".kn-edit-partial").is_file() for p in left)
    return left


def _look_alikes(folder: Path) -> dict[Path, str]:
    """The user's own files and folders named like leftovers (old and new patterns); path -> content."""
    made = {}
    for name in (".notes.abcd1234.partial", ".p.safetensors.zz_9abcd.partial"):  # files
        (folder / name).write_text(f"mine: {name}")
        made[folder / name] = f"mine: {name}"
    for name in (".model.efgh5678.partial", ".data.0123abcd.partial"):  # folders, one with a bad marker
        (folder / name).mkdir()
        (folder / name / "weights.bin").write_text(f"mine: {name}")
        made[folder / name / "weights.bin"] = f"mine: {name}"
    (folder / ".data.0123abcd.partial" / ".kn-edit-partial").write_text("{}")
    return made


def test_leftovers_of_killed_saves_are_removed_next_time(tmp_path, caplog):
    dead = _killed_saves(tmp_path)
    copy = tmp_path / ".model.ffff0000.partial"  # a genuine leftover copied under another name: its token differs
    shutil.copytree(dead[0], copy)
    unrelated = tmp_path / ".notes.partial"  # not a name kn-edit writes
    unrelated.write_text("keep")
    with caplog.at_level(logging.WARNING, logger="kn_edit.storage.atomic"):
        with atomic_dir(tmp_path / "running") as running:  # a save in progress holds its lock
            with atomic_file(tmp_path / "new.txt") as tmp:
                tmp.write_text("hello")
            assert running.is_dir()
    assert not any(p.exists() for p in dead)
    assert copy.is_dir() and unrelated.read_text() == "keep"
    assert (tmp_path / "new.txt").read_text() == "hello" and (tmp_path / "running").is_dir()
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert len(removed) == 2 and any("3.0 MB" in m for m in removed)
    assert any(f"left {copy} alone" in r.getMessage() for r in caplog.records)
    assert partials(tmp_path) == sorted([copy, unrelated])


def test_look_alikes_of_leftovers_survive_a_save(tmp_path, caplog):
    mine = _look_alikes(tmp_path)
    dead = _killed_saves(tmp_path)
    model, tok = build_model("llama")
    with caplog.at_level(logging.WARNING, logger="kn_edit.storage.atomic"):
        kn_edit.wrap(model, tok, name="tiny").save(tmp_path / "saved")
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
    assert {p: p.read_text() for p in mine} == mine
    assert not any(p.exists() for p in dead) and (tmp_path / "saved" / "config.json").is_file()
    left = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left ")]
    assert len(left) == 2 * 4 and all("kn-edit did not make it" in m for m in left)


def test_the_marker_never_reaches_the_result(tmp_path):
    model, tok = build_model("llama")
    saved = kn_edit.wrap(model, tok, name="tiny").save(tmp_path / "saved")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    with atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("x")
    assert ".kn-edit-partial" not in {p.name for p in saved.rglob("*")}
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x"] and (tmp_path / "f").read_text() == "x"
    assert partials(tmp_path) == []


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_results_get_the_users_umask(tmp_path, umask, folder, file):
    model, tok = build_model("llama")
    km = kn_edit.wrap(model, tok, name="tiny")
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir(mode=0o700)  # as mkdtemp, mkstemp and some writers make them
            os.close(os.open(tmp / "sub" / "x", os.O_CREAT | os.O_WRONLY, 0o600))
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
        km.save(tmp_path / "model")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == file
    for top in (tmp_path / "d", tmp_path / "model"):
        modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in [top, *top.rglob("*")]}
        assert modes == {p: folder if (tmp_path / p).is_dir() else file for p in modes}
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == file


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EditError, match="is not a folder"):
        check_writable(tmp_path / "file" / "deeper" / "out")
    assert check_writable(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone, nothing created


# ----- pictures the user names (--plot) --------------------------------------------------------------------
LOCATE = ["locate", "-p", PROMPT, "-t", "Paris", "steps=2"]
TRACE = ["trace", "-p", PROMPT, "-s", "France", "-t", "Paris", "--samples", "2"]
MINE = b"\x89PNG\r\n\x1a\n the user's own picture"


@pytest.mark.parametrize("argv", [LOCATE, TRACE], ids=["locate", "trace"])
def test_an_existing_plot_is_replaced_only_with_overwrite(tiny_load, tmp_path, capsys, argv):
    from kn_edit.cli import main

    plot = tmp_path / "plot.png"
    plot.write_bytes(MINE)
    assert main([*argv, "--plot", str(plot)]) == 2
    assert "already exists" in capsys.readouterr().err and plot.read_bytes() == MINE
    assert main([*argv, "--plot", str(plot), "--overwrite"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.read_bytes() != MINE
    assert partials(tmp_path) == []


@pytest.mark.parametrize("argv", [LOCATE, TRACE], ids=["locate", "trace"])
def test_the_plot_format_follows_the_extension(tiny_load, tmp_path, argv):
    from kn_edit.cli import main

    assert main([*argv, "--plot", str(tmp_path / "plot.PDF")]) == 0
    assert (tmp_path / "plot.PDF").read_bytes()[:5] == b"%PDF-"  # locate wrote PNG bytes under any name


def test_a_failed_plot_write_leaves_the_old_file(tiny_load, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kn_edit.cli import main

    def half_then_fail(self, fname, **kw):
        Path(fname).write_bytes(b"half a picture")
        raise KeyboardInterrupt  # Ctrl-C mid-write

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    plot = tmp_path / "plot.png"
    plot.write_bytes(MINE)
    assert main([*LOCATE, "--plot", str(plot), "--overwrite"]) == 130
    assert plot.read_bytes() == MINE and partials(tmp_path) == []


# ----- across processes -----------------------------------------------------------------------------------
CHILD = r"""
import os, sys, time
from pathlib import Path
import transformers
from kn_edit.cli import main

real = transformers.PreTrainedModel.save_pretrained
here = Path(sys.argv[1])

def slow_save(self, path, *a, **kw):
    real(self, path, *a, **kw)
    (here / f"ready-{os.getpid()}").write_text(str(path))  # the model is written into the temporary folder
    deadline = time.time() + 60
    while not (here / "go").exists() and time.time() < deadline:
        time.sleep(0.02)

transformers.PreTrainedModel.save_pretrained = slow_save
sys.exit(main(sys.argv[2:]))
"""


def _child(tmp_path: Path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _wait_ready(tmp_path: Path, n: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < n:
        assert time.time() < deadline, "children never reached the save"
        for p in procs:
            assert p.poll() is None, p.communicate()
        time.sleep(0.05)


@pytest.fixture
def saved(tmp_path) -> Path:
    model, tok = build_model("llama")
    return kn_edit.wrap(model, tok, name="tiny").save(tmp_path / "model")


def test_two_concurrent_saves_into_one_path_one_wins(saved, tmp_path):
    target = tmp_path / "out"
    argv = ["erase-fact", "-m", str(saved), "-p", PROMPT, "-t", "Paris", "--force", "--quiet", "--save", str(target)]
    procs = [_child(tmp_path, argv + ["--neurons", n]) for n in ("1:5", "1:7")]
    _wait_ready(tmp_path, 2, procs)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    winner = next(i for i, r in enumerate(results) if r[2] == 0)
    loser_err = results[1 - winner][1]
    assert "appeared while the model was being saved" in loser_err and "Traceback" not in loser_err
    erased = kn_edit.load(str(target), device="cpu")  # the winner's model, whole
    neuron = [Neuron(1, 5), Neuron(1, 7)][winner]
    assert float(erased.value_vectors(neuron.layer)[neuron.index].abs().sum()) == 0
    kept = Path(loser_err.split("the finished model is at ")[1].split(" (move it")[0])
    loser = kn_edit.load(str(kept), device="cpu")  # the loser's model, whole, where the message says
    other = [Neuron(1, 5), Neuron(1, 7)][1 - winner]
    assert float(loser.value_vectors(other.layer)[other.index].abs().sum()) == 0
    assert partials(tmp_path) == []


def test_sigterm_during_a_save_cleans_up(saved, tmp_path):
    target = tmp_path / "out"
    proc = _child(tmp_path, ["erase-fact", "-m", str(saved), "-p", PROMPT, "-t", "Paris", "--force", "--neurons",
                             "1:5", "--quiet", "--save", str(target)])
    _wait_ready(tmp_path, 1, [proc])
    assert len(partials(tmp_path)) == 1  # the save is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not target.exists() and partials(tmp_path) == []


def test_a_save_after_a_killed_one_removes_its_leftover(saved, tmp_path, capsys):
    target = tmp_path / "out"
    proc = _child(tmp_path, ["erase-fact", "-m", str(saved), "-p", PROMPT, "-t", "Paris", "--force", "--neurons",
                             "1:5", "--quiet", "--save", str(target)])
    _wait_ready(tmp_path, 1, [proc])
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=60)
    assert len(partials(tmp_path)) == 1
    from kn_edit.cli import main

    assert main(["erase-fact", "-m", str(saved), "-p", PROMPT, "-t", "Paris", "--force", "--neurons", "1:5",
                 "--quiet", "--save", str(target)]) == 0
    assert partials(tmp_path) == [] and (target / "config.json").is_file()


# ----- evaluation runs: an existing run is never touched; Ctrl-C / SIGTERM under Lightning ------------------------
class WaitingEditor(ValueVectorEditor):
    """The tests' value-vector editor; where $KN_EDIT_TEST_READY names a file not yet there, its edit number
    $KN_EDIT_TEST_AFTER + 1 (default 1) in process 0 creates that file and waits (up to a minute) to be stopped,
    so that a signal lands in the middle of Lightning's test loop."""

    calls = 0

    def compute(self, km, requests):
        ready = os.environ.get("KN_EDIT_TEST_READY")
        WaitingEditor.calls += 1
        first, after = os.environ.get("LOCAL_RANK", "0") == "0", int(os.environ.get("KN_EDIT_TEST_AFTER", "0"))
        if ready and first and WaitingEditor.calls > after and not os.path.exists(ready):
            Path(ready).write_text(str(os.getpid()))
            deadline = time.time() + 60
            while time.time() < deadline:
                time.sleep(0.05)
        return super().compute(km, requests)


# The command line as a user's terminal runs it: Ctrl-C raises KeyboardInterrupt even where the test runner was
# started in the background (which leaves SIGINT ignored in its children). A file, not `-c`: Lightning's DDP
# launcher starts the other processes by running sys.argv[0] again.
RUNNER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from kn_edit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def eval_world(tmp_path) -> Path:
    """A tiny saved model, its facts and text, eval.yaml (the waiting editor) and cmp.yaml (the value-vector
    editor, then the waiting one)."""
    kn_edit.wrap(*build_model("llama"), name="tiny").save(tmp_path / "model")
    write_capital_facts(tmp_path / "facts.jsonl")
    (tmp_path / "text.txt").write_text("\n\n".join(PASSAGES))
    common = f"""
model: {tmp_path / "model"}
data: {{source: jsonl, path: {tmp_path / "facts.jsonl"}, only_known: false, neighbours: 2}}
text: {{source: file, path: {tmp_path / "text.txt"}, passages: 2}}
probe: {{steps: 2}}
trainer: {{accelerator: cpu}}
output_dir: {tmp_path / "runs"}
plots: false
"""
    (tmp_path / "eval.yaml").write_text("name: ev\n" + common + 'editor: {method: "test_safe_saves:WaitingEditor"}\n')
    (tmp_path / "cmp.yaml").write_text("name: cmp\n" + common + "methods:\n"
                                       '  - {method: "helpers:ValueVectorEditor", label: vv}\n'
                                       '  - {method: "test_safe_saves:WaitingEditor", label: waiting}\n')  # fmt: skip
    (tmp_path / "runner.py").write_text(RUNNER)
    return tmp_path


def _stopped_run(world: Path, argv: list[str], signum: int, after: int = 0, check=None) -> tuple[int, str]:
    """Run the CLI in a child process, send ``signum`` once the waiting editor waits (after ``check()``, which
    may look at what was written so far), and return (exit code, stderr)."""
    ready = world / "ready"
    env = {**os.environ, "KN_EDIT_TEST_READY": str(ready), "KN_EDIT_TEST_AFTER": str(after),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(world / "runner.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=world)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not ready.exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate(timeout=60)
            time.sleep(0.05)
        if check is not None:
            check()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_an_existing_run_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    """evaluate and compare with the run_name of an earlier run: refused before any model is loaded, and the
    earlier run's folder and sequential progress file are left byte for byte as they were."""
    import kn_edit.models.loading
    from kn_edit import ConfigError
    from kn_edit.evaluation import EvalConfig, evaluate
    from kn_edit.evaluation.compare import compare_methods
    from kn_edit.evaluation.config import CompareConfig

    runs = tmp_path / "runs"
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "metrics.json").write_text("{}")
    (runs / "stopped.progress.json").write_text('{"edits_made": 7}')  # a stopped sequential run's curve
    before = file_tree(runs)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kn_edit.models.loading, "load", no_loading)
    for config, run in ((EvalConfig(), "taken"), (EvalConfig(mode="sequential"), "stopped"), (CompareConfig(), "taken")):
        config.output_dir, config.run_name = str(runs), run
        with pytest.raises(ConfigError, match=f"{run}(.progress.json)? already exists"):
            (compare_methods if isinstance(config, CompareConfig) else evaluate)(config)
    assert file_tree(runs) == before


def test_a_progress_file_that_appears_during_a_sequential_run_survives(tiny_factory, tmp_path):
    """The first checkpoint's progress file is written only where none is: one that appeared after the checks
    (another run of the same name) is left alone, and the run stops."""
    config = tiny_config(tmp_path)
    config.mode, config.checkpoints = "sequential", [1, 2]
    progress = tmp_path / "run.progress.json"

    class Racing(ValueVectorEditor):
        def compute(self, km, requests):
            if not progress.exists():
                progress.write_text("mine")
            return super().compute(km, requests)

    from kn_edit.evaluation import evaluate

    with pytest.raises(EditError, match="run.progress.json already exists"):
        evaluate(config, km=tiny_factory("llama"), editor=Racing(), facts=tiny_facts(), passages=PASSAGES)
    assert progress.read_text() == "mine" and not (tmp_path / "run").exists()


def test_sigterm_during_compare_exits_143_and_resuming_gives_the_uninterrupted_numbers(eval_world, monkeypatch, capsys):
    import kn_edit.evaluation.compare as compare_module

    runs, parts = eval_world / "runs", eval_world / "runs" / ".cmp.parts"
    config = ["compare", "--quiet", "--config", str(eval_world / "cmp.yaml")]

    def first_method_kept():
        assert sorted(p.name for p in parts.iterdir()) == ["vv.json"]

    code, err = _stopped_run(eval_world, config + ["run_name=stopped"], signal.SIGTERM, check=first_method_kept)
    assert code == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not (runs / "stopped").exists() and partials(runs) == [] and partials(parts) == []
    assert sorted(p.name for p in parts.iterdir()) == ["vv.json"]

    real, calls = compare_module.evaluate, []
    monkeypatch.setattr(compare_module, "evaluate", lambda c, **kw: calls.append(c.editor.method) or real(c, **kw))
    assert main(config + ["run_name=resumed", "resume=true"]) == 0
    assert calls == ["test_safe_saves:WaitingEditor"]  # the method that was stopped, only
    assert main(config + ["run_name=fresh"]) == 0
    capsys.readouterr()
    resumed, fresh = (json.loads((runs / name / "metrics.json").read_text())["methods"] for name in ("resumed", "fresh"))
    assert resumed.keys() == fresh.keys() == {"vv", "waiting"}
    for title in fresh:
        measured = [k for k in fresh[title] if "seconds" not in k and "memory" not in k]
        ours, theirs = ({k: m[title][k] for k in measured} for m in (resumed, fresh))
        # the kept part was measured in another process, whose thread count can round float32 sums differently
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-9, nan_ok=True), title


@pytest.mark.parametrize("kind", ["single-sigint", "ddp-sigterm", "sequential-sigterm"])
def test_a_stopped_evaluate_exits_130_or_143_and_writes_no_run(eval_world, kind, capsys):
    """Ctrl-C: 130, SIGTERM: 143, with the CLI's message, also when Lightning runs the loop in two processes
    (the signal goes to the first). A sequential run keeps the curve it had measured; the run's name stays taken
    by it: a second run of that name is refused and leaves it as it was."""
    runs = eval_world / "runs"
    argv = ["evaluate", "--quiet", "--config", str(eval_world / "eval.yaml"), "run_name=stopped"]
    extra = {"single-sigint": [], "ddp-sigterm": ["trainer.devices=2", "trainer.strategy=ddp"],
             "sequential-sigterm": ["mode=sequential", "checkpoints=[1,2,4]"]}[kind]  # fmt: skip
    signum = signal.SIGINT if "sigint" in kind else signal.SIGTERM
    code, err = _stopped_run(eval_world, argv + extra, signum, after=2 if kind.startswith("sequential") else 0)
    assert code == (130 if signum == signal.SIGINT else 143), err
    assert ("interrupted" if signum == signal.SIGINT else "terminated") in err and "Traceback" not in err
    assert not (runs / "stopped").exists()
    if not kind.startswith("sequential"):
        assert not runs.exists() or partials(runs) == []
        return
    assert partials(runs) == []
    progress = json.loads((runs / "stopped.progress.json").read_text())
    assert progress["edits_made"] == 2 and [c["n_edits"] for c in progress["curve"]] == [0, 1, 2]
    before = file_tree(runs)
    assert main(argv + extra) == 2
    assert "stopped.progress.json already exists" in capsys.readouterr().err
    assert file_tree(runs) == before
