"""Checkpoints never unpickle code: optimizer, scheduler and RNG files load with weights_only=True, and a
file holding a pickled object is refused in one sentence instead of being executed."""

import pickle
import random

import numpy as np
import pytest
import torch

from hanorec.train.checkpoint import CheckpointError, _load_tensors, rng_state, set_rng_state


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_object_is_refused_not_executed(tmp_path, capsys):
    with open(tmp_path / "rng.pt", "wb") as f:
        pickle.dump({"torch": _Payload()}, f)
    with pytest.raises(CheckpointError, match="rng.pt cannot be loaded as plain tensors"):
        _load_tensors(tmp_path / "rng.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_optimizer_and_scheduler_states_load_as_plain_tensors(tmp_path):
    from hanorec.train.loop import cosine_with_warmup

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = cosine_with_warmup(opt, 2, 10)
    p.sum().backward()
    opt.step(), sched.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt2.load_state_dict(_load_tensors(tmp_path / "optimizer.pt"))
    sched2 = cosine_with_warmup(opt2, 2, 10)
    sched2.load_state_dict(_load_tensors(tmp_path / "scheduler.pt"))
    assert sched2.get_last_lr() == sched.get_last_lr()
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
