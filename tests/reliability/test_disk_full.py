"""A checkpoint that does not fit: the stage fails with one line and leaves nothing partial behind
(the unit half; the reliability suite fills a real small filesystem during a real train stage)."""
import errno
import shutil
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from loop.train import sft


def _trainer(ckpt_dir, error=None):
    @contextmanager
    def as_directory():
        yield str(ckpt_dir)

    def fit():
        if error:
            raise error
        return SimpleNamespace(checkpoint=SimpleNamespace(as_directory=as_directory), metrics={"loss": 0.1},
                               error=None)

    return SimpleNamespace(fit=fit)


def test_no_space_while_copying_the_checkpoint_keeps_nothing(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    out = tmp_path / "adapter"
    real = shutil.copytree

    def full_disk(src, dst, **kw):
        real(src, dst, **kw)  # the copy got some way, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sft.shutil, "copytree", full_disk)
    with pytest.raises(sft.CheckpointNotWritten, match=r"no space left on the disk of .* \(nothing was kept\)"):
        sft.fit_to_dir(_trainer(ckpt), "run-x", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no adapter, no adapter.tmp"


def test_no_space_inside_the_training_run_is_named_too(tmp_path):
    boom = RuntimeError("worker failed")
    boom.worker_failures = {0: "OSError: [Errno 28] No space left on device: '/x/checkpoint_1'"}
    with pytest.raises(sft.CheckpointNotWritten, match="no space left"):
        sft.fit_to_dir(_trainer(tmp_path, error=boom), "run-y", tmp_path / "adapter")


def test_another_os_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    def denied(src, dst, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sft.shutil, "copytree", denied)
    with pytest.raises(PermissionError):
        sft.fit_to_dir(_trainer(tmp_path), "run-z", tmp_path / "adapter")
