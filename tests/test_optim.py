"""Optimizers against hand-computed steps (numpy, float64) and against torch.optim where definitions coincide."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optiscope.optim import (
    OPTIMIZERS,
    SGD,
    Adagrad,
    Adam,
    AMSGrad,
    HeavyBall,
    RMSProp,
    SignGD,
    make_optimizer,
)

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 0.1]])
B = np.array([1.0, -2.0, 0.5])
THETA0 = np.array([0.7, -1.3, 2.1])


def grad_np(theta: np.ndarray) -> np.ndarray:
    """Gradient of the toy loss E(theta) = theta^T A theta / 2 - b^T theta + sum(sin(theta))."""
    return A @ theta - B + np.cos(theta)


def loss_torch(p: torch.Tensor) -> torch.Tensor:
    At, Bt = torch.tensor(A), torch.tensor(B)
    return 0.5 * p @ At @ p - Bt @ p + torch.sin(p).sum()


def run_torch(opt_factory, steps: int = 6, theta0=THETA0, lr_sequence=None):
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = opt_factory([p])
    traj = []
    for n in range(steps):
        if lr_sequence is not None:
            for g in opt.param_groups:
                g["lr"] = lr_sequence[n]
        opt.zero_grad()
        loss_torch(p).backward()
        opt.step()
        traj.append(p.detach().numpy().copy())
    return np.array(traj), opt


# ----------------------------------------------------------------------------------------- hand-computed rules
def adam_reference(lr, b1, b2, eps, inside, bias_correction, steps=6, wd=0.0, amsgrad=False):
    theta = THETA0.copy()
    m = np.zeros(3)
    v = np.zeros(3)
    vmax = np.zeros(3)
    out = []
    for n in range(steps):
        g = grad_np(theta) + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        vv = vmax if amsgrad else v
        c1 = 1 - b1 ** (n + 1) if bias_correction else 1.0
        c2 = 1 - b2 ** (n + 1) if bias_correction else 1.0
        denom = np.sqrt(vv / c2 + eps) if inside else np.sqrt(vv / c2) + eps
        theta = theta - lr * (m / c1) / denom
        out.append(theta.copy())
    return np.array(out)


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_adam_matches_hand_computed_steps(inside, bias_correction):
    lr, b1, b2, eps = 0.05, 0.8, 0.95, 1e-2  # eps large so inside vs outside differ visibly
    ref = adam_reference(lr, b1, b2, eps, inside, bias_correction)
    traj, opt = run_torch(lambda p: Adam(p, lr=lr, betas=(b1, b2), eps=eps, eps_inside_sqrt=inside,
                                         bias_correction=bias_correction))
    np.testing.assert_allclose(traj, ref, rtol=0, atol=1e-13)
    other = adam_reference(lr, b1, b2, eps, not inside, bias_correction)
    assert np.abs(other - ref).max() > 1e-3  # the flag changes the rule


def test_adam_first_step_bias_correction_power_is_one():
    # Step n=0: m/(1-b1) = g and v/(1-b2) = g^2 exactly, so theta_1 = theta_0 - lr g/sqrt(g^2 + eps).
    lr, eps = 0.1, 1e-3
    traj, _ = run_torch(lambda p: Adam(p, lr=lr, betas=(0.9, 0.999), eps=eps), steps=1)
    g = grad_np(THETA0)
    np.testing.assert_allclose(traj[0], THETA0 - lr * g / np.sqrt(g * g + eps), atol=1e-14)


def test_adam_eps_outside_equals_torch_adam():
    kw = {"lr": 0.03, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.01}
    ours, _ = run_torch(lambda p: Adam(p, eps_inside_sqrt=False, **kw), steps=8)
    ref, _ = run_torch(lambda p: torch.optim.Adam(p, **kw), steps=8)
    np.testing.assert_allclose(ours, ref, atol=1e-13)


def test_adamw_decoupled_equals_torch_adamw():
    kw = {"lr": 0.03, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.1}
    ours, _ = run_torch(lambda p: Adam(p, eps_inside_sqrt=False, decoupled_weight_decay=True, **kw), steps=8)
    ref, _ = run_torch(lambda p: torch.optim.AdamW(p, **kw), steps=8)
    np.testing.assert_allclose(ours, ref, atol=1e-13)


def test_amsgrad_hand_and_torch():
    kw = {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-3}
    ours, _ = run_torch(lambda p: AMSGrad(p, **kw), steps=10)
    ref = adam_reference(0.05, 0.5, 0.9, 1e-3, inside=False, bias_correction=True, steps=10, amsgrad=True)
    np.testing.assert_allclose(ours, ref, atol=1e-13)
    tref, _ = run_torch(lambda p: torch.optim.Adam(p, amsgrad=True, **kw), steps=10)
    np.testing.assert_allclose(ours, tref, atol=1e-13)
    # the running max must actually bind on this trajectory, else AMSGrad == Adam and the test proves little
    plain = adam_reference(0.05, 0.5, 0.9, 1e-3, inside=False, bias_correction=True, steps=10)
    assert np.abs(plain - ref).max() > 1e-6


@pytest.mark.parametrize("inside", [True, False])
def test_rmsprop_hand_computed(inside):
    lr, beta, eps = 0.02, 0.9, 1e-2
    theta, v, out = THETA0.copy(), np.zeros(3), []
    for _ in range(6):
        g = grad_np(theta)
        v = beta * v + (1 - beta) * g * g
        theta = theta - lr * g / (np.sqrt(v + eps) if inside else np.sqrt(v) + eps)
        out.append(theta.copy())
    traj, opt = run_torch(lambda p: RMSProp(p, lr=lr, beta=beta, eps=eps, eps_inside_sqrt=inside))
    np.testing.assert_allclose(traj, np.array(out), atol=1e-13)
    P = opt.diagonal_preconditioner()[0].numpy()
    np.testing.assert_allclose(P, np.sqrt(v + eps) if inside else np.sqrt(v) + eps, atol=1e-14)


def test_rmsprop_eps_outside_with_momentum_equals_torch():
    kw = {"lr": 0.01, "eps": 1e-4, "momentum": 0.9, "weight_decay": 0.05}
    ours, _ = run_torch(lambda p: RMSProp(p, beta=0.95, eps_inside_sqrt=False, **kw), steps=8)
    ref, _ = run_torch(lambda p: torch.optim.RMSprop(p, alpha=0.95, **kw), steps=8)
    np.testing.assert_allclose(ours, ref, atol=1e-13)


def test_adagrad_hand_and_torch():
    kw = {"lr": 0.1, "eps": 1e-6, "lr_decay": 0.05, "initial_accumulator_value": 0.2, "weight_decay": 0.01}
    ours, opt = run_torch(lambda p: Adagrad(p, **kw), steps=7)
    ref, _ = run_torch(lambda p: torch.optim.Adagrad(p, **kw), steps=7)
    np.testing.assert_allclose(ours, ref, atol=1e-13)
    theta, s = THETA0.copy(), np.full(3, 0.2)
    for n in range(7):
        g = grad_np(theta) + 0.01 * theta
        s = s + g * g
        theta = theta - 0.1 / (1 + n * 0.05) * g / (np.sqrt(s) + 1e-6)
    np.testing.assert_allclose(ours[-1], theta, atol=1e-13)
    np.testing.assert_allclose(opt.diagonal_preconditioner()[0].numpy(), np.sqrt(s) + 1e-6, atol=1e-13)


@pytest.mark.parametrize("kw", [{"momentum": 0.0}, {"momentum": 0.9, "weight_decay": 1e-3},
                                {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.9, "nesterov": True}])
def test_sgd_equals_torch_sgd(kw):
    lrs = [0.05, 0.05, 0.02, 0.02, 0.01, 0.01, 0.01, 0.005]
    ours, _ = run_torch(lambda p: SGD(p, lr=0.05, **kw), steps=8, lr_sequence=lrs)
    ref, _ = run_torch(lambda p: torch.optim.SGD(p, lr=0.05, **kw), steps=8, lr_sequence=lrs)
    np.testing.assert_allclose(ours, ref, atol=1e-13)


@pytest.mark.parametrize("beta", [0.9, -0.5])
def test_heavyball_seed004_eq1(beta):
    alpha = 0.05
    theta, prev, out = THETA0.copy(), THETA0.copy(), []
    for _ in range(8):
        nxt = theta - alpha * grad_np(theta) + beta * (theta - prev)
        prev, theta = theta, nxt
        out.append(theta.copy())
    traj, opt = run_torch(lambda p: HeavyBall(p, lr=alpha, momentum=beta), steps=8)
    np.testing.assert_allclose(traj, np.array(out), atol=1e-13)
    assert opt.effective_lr == pytest.approx(alpha / (1 - beta))
    # constant lr: identical to torch's SGD with the same momentum (the conventions coincide)
    tref, _ = run_torch(lambda p: torch.optim.SGD(p, lr=alpha, momentum=beta) if beta >= 0 else
                        SGD(p, lr=alpha, momentum=beta), steps=8)
    np.testing.assert_allclose(traj, tref, atol=1e-12)


def test_heavyball_differs_from_pytorch_convention_when_lr_changes():
    lrs = [0.05, 0.05, 0.01, 0.01]
    hb, _ = run_torch(lambda p: HeavyBall(p, lr=0.05, momentum=0.9), steps=4, lr_sequence=lrs)
    sg, _ = run_torch(lambda p: SGD(p, lr=0.05, momentum=0.9), steps=4, lr_sequence=lrs)
    np.testing.assert_allclose(hb[:2], sg[:2], atol=1e-13)
    assert np.abs(hb[2] - sg[2]).max() > 1e-4


def test_signgd_hand_computed_and_zero_gradient():
    traj, _ = run_torch(lambda p: SignGD(p, lr=0.01), steps=3)
    theta = THETA0.copy()
    for _ in range(3):
        theta = theta - 0.01 * np.sign(grad_np(theta))
    np.testing.assert_allclose(traj[-1], theta, atol=1e-14)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = SignGD([p], lr=0.1)
    p.grad = torch.tensor([0.0, -3.0], dtype=torch.float64)
    opt.step()
    assert p.detach().tolist() == [1.0, 1.1]


def test_diagonal_preconditioner_alignment_and_adam_value():
    p1 = torch.nn.Parameter(torch.tensor(THETA0))
    p2 = torch.nn.Parameter(torch.tensor([[0.3, -0.2]], dtype=torch.float64))
    opt = Adam([{"params": [p1]}, {"params": [p2], "lr": 0.01}], lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    pre = opt.diagonal_preconditioner()
    assert [t.shape for t in pre] == [p1.shape, p2.shape]
    assert torch.allclose(pre[0], torch.full_like(p1, math.sqrt(1e-3)))  # before any step: the eps floor
    for _ in range(3):
        opt.zero_grad()
        (loss_torch(p1) + (p2 ** 4).sum()).backward()
        opt.step()
    v = opt.state[p1]["v"]
    expected = torch.sqrt(v / (1 - 0.99 ** 3) + 1e-3)
    assert torch.allclose(opt.diagonal_preconditioner()[0], expected, atol=1e-15)
    assert opt.perturbation_eps == 1e-3
    sgd = SGD([p1], lr=0.1, momentum=0.9)
    assert sgd.diagonal_preconditioner() == [None] and sgd.perturbation_eps is None


def test_perturbation_eps_rejects_mixed_groups():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = Adam([{"params": [a], "eps": 1e-8}, {"params": [b], "eps": 1e-6}])
    with pytest.raises(ValueError, match="different eps"):
        _ = opt.perturbation_eps


@pytest.mark.parametrize("factory,kw,match", [
    (Adam, {"lr": 0.0}, "learning rate"), (Adam, {"lr": -1e-3}, "learning rate"),
    (Adam, {"lr": float("nan")}, "learning rate"),
    (Adam, {"betas": (1.0, 0.9)}, "betas"), (Adam, {"betas": (0.9, -0.1)}, "betas"),
    (Adam, {"betas": (0.9,)}, "betas"), (Adam, {"eps": -1e-8}, "eps"),
    (AMSGrad, {"betas": (0.9, 1.2)}, "betas"), (RMSProp, {"beta": 1.0}, "beta"),
    (RMSProp, {"eps": -1.0}, "eps"), (RMSProp, {"momentum": 1.0}, "momentum"),
    (Adagrad, {"lr": 0}, "learning rate"), (Adagrad, {"eps": -1}, "eps"),
    (SGD, {"momentum": 1.0}, "momentum"), (SGD, {"momentum": -1.0}, "momentum"),
    (SGD, {"weight_decay": -0.1}, "weight_decay"), (HeavyBall, {"momentum": 1.5}, "momentum"),
    (HeavyBall, {"momentum": -1.0}, "momentum"), (SignGD, {"lr": -0.1}, "learning rate"),
])
def test_invalid_hyperparameters_raise_value_error(factory, kw, match):
    with pytest.raises(ValueError, match=match):
        factory([torch.nn.Parameter(torch.ones(2))], **kw)


def test_invalid_param_group_rejected():
    opt = Adam([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "lr": -1.0})


def test_make_optimizer_specs():
    params = [torch.nn.Parameter(torch.ones(2))]
    assert set(OPTIMIZERS) == {"sgd", "sgdm", "heavyball", "signgd", "adam", "rmsprop", "adagrad", "amsgrad"}
    opt = make_optimizer("adam:lr=1e-2,betas=[0.8,0.9],eps_inside_sqrt=false", params)
    assert isinstance(opt, Adam) and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["eps_inside_sqrt"] is False and opt.defaults["lr"] == 1e-2
    sgdm = make_optimizer("sgdm", params)
    assert isinstance(sgdm, SGD) and sgdm.defaults["momentum"] == 0.9
    assert make_optimizer("sgd", params).defaults["momentum"] == 0.0
    assert make_optimizer(("sgdm", {"weight_decay": 1e-3}), params).defaults["weight_decay"] == 1e-3
    assert isinstance(make_optimizer(("heavyball", {"momentum": -0.3}), params), HeavyBall)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lion", params)
    with pytest.raises(ValueError, match="does not accept"):
        make_optimizer("sgd:betas=[0.9,0.9]", params)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("rmsprop:lr=-1", params)


def test_nonfinite_gradient_does_not_crash():
    p = torch.nn.Parameter(torch.ones(2))
    opt = Adam([p], lr=0.1)
    p.grad = torch.tensor([float("inf"), 1.0])
    opt.step()
    assert not torch.isfinite(p).all()  # recorded as divergence by the training loop, not an exception


def test_all_optimizers_descend_on_toy():
    for name in OPTIMIZERS:
        lr = {"sgd": 0.05, "sgdm": 0.02, "heavyball": 0.02, "signgd": 0.01}.get(name, 0.02)
        p = torch.nn.Parameter(torch.tensor(THETA0))
        opt = make_optimizer((name, {"lr": lr}), [p])
        start = loss_torch(p).item()
        for _ in range(100):
            opt.zero_grad()
            loss_torch(p).backward()
            opt.step()
        assert loss_torch(p).item() < start - 0.5, name
