"""`mvm-supervisor wait` on a new installation: the supervisor just started has not made its certificates yet."""

from __future__ import annotations

import argparse
import os

from services.supervisor.main import cmd_wait


def test_wait_keeps_waiting_while_the_certificates_are_not_made_yet(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MVM_STATE_DIR", raising=False)
    (tmp_path / "supervisor.pid").write_text(str(os.getpid()))  # a live supervisor, as `start` leaves it
    args = argparse.Namespace(state_dir=str(tmp_path), config=None, timeout=1.0, role="all", etcd=None)
    assert cmd_wait(args) == 1  # timed out, not a configuration error (`make up` on a new machine used to stop)
    assert "certificates" in capsys.readouterr().err
