"""One trainer per output directory: the lock, and readers that never see half a metrics line."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from fastgpt.errors import FastGPTError
from fastgpt.run_files import read_metrics, read_run_config
from fastgpt.run_lock import RunLock

HOLD_THE_LOCK = """
import sys, time
from fastgpt.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(FastGPTError) as refused:
        RunLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert f"another training run is using {tmp_path / 'run'}" in message
    assert f"PID {holder.pid}: " in message and "fastgpt.run_lock" in message
    assert "\n" not in message


def test_sigkill_of_the_holder_releases_the_lock(tmp_path, holder):
    holder.kill()  # SIGKILL: no Python code of the holder runs
    holder.wait()
    with RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text()) == {"pid": os.getpid(), "command": shlex.join(sys.orig_argv)}


def test_the_lock_excludes_a_second_holder_in_the_same_process_until_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(FastGPTError, match=f"PID {os.getpid()}: "):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # twice is harmless
    assert (tmp_path / ".lock").read_text() == ""  # no stale holder left in the file
    with RunLock(tmp_path):
        pass


def test_a_directory_made_for_a_run_that_wrote_nothing_goes_with_its_lock(tmp_path):
    """A run refused once it holds the lock (a model too large, say) leaves no empty folder behind;
    a folder that was there before, or that the run wrote to, stays."""
    RunLock(tmp_path / "new" / "run").acquire().release()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new"]
    RunLock(tmp_path / "new").acquire().release()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".lock"]
    written = RunLock(tmp_path / "written").acquire()
    (tmp_path / "written" / "config.json").write_text("{}")
    written.release()
    assert (tmp_path / "written" / "config.json").exists()


def test_a_lock_file_removed_before_it_was_locked_is_made_again(tmp_path, monkeypatch):
    """A refused run taking its folder away (above) while another run opens the lock file must not leave
    that run holding a lock nobody else can see."""
    lock, removed = RunLock(tmp_path), []
    open_and_lock = lock._open_and_lock

    def removed_once_locked():
        descriptor = open_and_lock()
        if not removed:
            removed.append((tmp_path / ".lock").unlink())
        return descriptor
    monkeypatch.setattr(lock, "_open_and_lock", removed_once_locked)
    lock.acquire()
    with pytest.raises(FastGPTError, match=f"PID {os.getpid()}: "):
        RunLock(tmp_path).acquire()
    lock.release()


def test_a_holder_still_starting_is_named_as_such(tmp_path):
    import fcntl

    # A process that has locked but not yet written its line, as just after flock.
    descriptor = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        with pytest.raises(FastGPTError, match="a process that is just starting"):
            RunLock(tmp_path).acquire()
    finally:
        os.close(descriptor)


def test_an_unwritable_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FastGPTError, match="cannot write to the output directory"):
        RunLock(blocker / "run").acquire()


# ---- readers


def test_read_metrics_leaves_out_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 10, "train_loss": 2.5}, {"step": 20, "train_loss": float("nan"), "val_loss": 2.4}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"step": 30, "train_l')
    read = read_metrics(path)
    assert [r["step"] for r in read] == [10, 20] and read[1]["val_loss"] == 2.4
    path.write_text(text + '{"step": 30}')  # whole, but its newline has not landed yet
    assert [r["step"] for r in read_metrics(path)] == [10, 20]
    path.write_text(text + '{"step": 30}\n\n')
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
    path.write_text("")
    assert read_metrics(path) == []


def test_read_metrics_refuses_a_damaged_line_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10}\n{"step": 2\n{"step": 30}\n')
    with pytest.raises(FastGPTError, match="line 2 of .* is not a JSON object"):
        read_metrics(path)
    path.write_text('{"step": 10}\n{"val_loss": 2.5}\n')  # an object, but not one the trainer wrote
    with pytest.raises(FastGPTError, match="line 2 of .* is not a JSON object with a step"):
        read_metrics(path)
    with pytest.raises(FastGPTError, match="no metrics at"):
        read_metrics(tmp_path / "nothing.jsonl")


def test_read_run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))
    assert read_run_config(tmp_path) == {"n_layer": 2}
    with pytest.raises(FastGPTError, match="config.json has no 'block_size' setting"):
        read_run_config(tmp_path)["block_size"]
    (tmp_path / "config.json").write_text("[2]")
    with pytest.raises(FastGPTError, match="is not a JSON object"):
        read_run_config(tmp_path)
    with pytest.raises(FastGPTError, match="no config.json in"):
        read_run_config(tmp_path / "elsewhere")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(FastGPTError, match="cannot read"):
        read_run_config(tmp_path)


def test_training_into_a_directory_another_process_trains_in_is_refused(tmp_path, holder, corpus):
    """The trainer takes the lock before touching the directory: a second one, fresh or --resume, stops at
    once naming the running process, and leaves the directory as it was."""
    from fastgpt.config import parse_config
    from fastgpt.train import train

    for extra in ([], ["--resume"]):
        config = parse_config(["--data", str(corpus), "--out-dir", str(tmp_path / "run"), *extra])
        with pytest.raises(FastGPTError, match=f"another training run is using .*PID {holder.pid}"):
            train(config)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
