"""Issue 27: the teacher EMA as one lerp per tensor list gives the former multiply-and-add's teacher."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.distributed import ema_update


def test_ema_update_equals_the_former_multiply_and_add() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(64, 32), nn.Linear(64, 32)
    former = [p.detach().clone() for p in teacher.parameters()]
    for momentum in (0.992, 0.5, 1.0):
        ema_update(teacher, student, momentum)
        with torch.no_grad():
            for t, s in zip(former, student.parameters(), strict=True):
                t.mul_(momentum).add_(s, alpha=1.0 - momentum)
        for got, want in zip(teacher.parameters(), former, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)  # a frozen teacher stays bit for bit
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before, strict=True))
