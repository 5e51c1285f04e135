"""Learning-rate schedules against torch.optim.lr_scheduler, step for step."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from rnnfast import lr_scheduler as ours
from rnnfast.optim import SGD, Adam


def _pair(lr=0.1):
    torch = pytest.importorskip("torch")
    opt = SGD({"w": np.zeros(2)}, lr=lr)
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=lr)
    return torch, opt, topt


SCHEDULES = {
    "StepLR": lambda m, o: m.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda m, o: m.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3),
    "ExponentialLR": lambda m, o: m.ExponentialLR(o, gamma=0.9),
    "LinearLR": lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=4),
    "CosineAnnealingLR": lambda m, o: m.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
    "LambdaLR": lambda m, o: m.LambdaLR(o, lambda t: 1 / (1 + t)),
    "warmup then cosine": lambda m, o: m.SequentialLR(
        o,
        [m.LinearLR(o, start_factor=0.2, total_iters=3), m.CosineAnnealingLR(o, T_max=6)],
        milestones=[3],
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_torch(name):
    torch, opt, topt = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warnings about its own step order
        mine, theirs = SCHEDULES[name](ours, opt), SCHEDULES[name](torch.optim.lr_scheduler, topt)
        for step in range(15):
            assert math.isclose(opt.lr, topt.param_groups[0]["lr"], rel_tol=1e-12,
                                abs_tol=1e-15), (name, step)  # fmt: skip
            assert mine.get_last_lr() == [opt.lr]
            topt.step()
            mine.step()
            theirs.step()


def test_schedule_state_dict_resumes_exactly():
    opt = Adam({"w": np.zeros(2)}, lr=1e-2)
    s = ours.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        s.step()
    state, lr = s.state_dict(), opt.lr
    opt2 = Adam({"w": np.zeros(2)}, lr=1e-2)
    s2 = ours.CosineAnnealingLR(opt2, T_max=10)
    s2.load_state_dict(state)
    assert opt2.lr == lr
    s.step()
    s2.step()
    assert opt.lr == opt2.lr
    with pytest.raises(ValueError, match="last_epoch"):
        s2.load_state_dict({"epoch": 3})


def test_reduce_on_plateau_matches_torch():
    torch, opt, topt = _pair(1.0)
    metrics = [5, 4, 4, 4, 4, 3.9999, 4, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2]
    for kwargs in ({"patience": 2, "factor": 0.5, "cooldown": 1},
                   {"mode": "max", "patience": 1, "threshold_mode": "abs", "threshold": 0.5},
                   {"patience": 0, "min_lr": 0.3}):  # fmt: skip
        opt.lr = 1.0
        topt.param_groups[0]["lr"] = 1.0
        mine = ours.ReduceLROnPlateau(opt, **kwargs)
        theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
        for i, m in enumerate(metrics):
            mine.step(m)
            theirs.step(m)
            assert math.isclose(opt.lr, topt.param_groups[0]["lr"], rel_tol=1e-12), (kwargs, i)


def test_schedule_misuse():
    opt = SGD({"w": np.zeros(2)}, lr=0.1)
    with pytest.raises(ValueError, match="step_size"):
        ours.StepLR(opt, step_size=0)
    with pytest.raises(TypeError, match="rnnfast optimizer"):
        ours.StepLR({"lr": 0.1}, step_size=2)
    with pytest.raises(ValueError, match="increasing milestones"):
        ours.SequentialLR(opt, [ours.StepLR(opt, 2), ours.StepLR(opt, 3)], milestones=[])
    with pytest.raises(ValueError, match="NaN"):
        ours.ReduceLROnPlateau(opt).step(float("nan"))
    with pytest.raises(ValueError, match="mode"):
        ours.ReduceLROnPlateau(opt, mode="lowest")
