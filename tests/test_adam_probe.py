"""The adam_correction probe (lab contract): values equal the flow layer's correction term; the probe is pure."""

import math

import pytest
import torch

from optiscope.lab import Problem, Run, make_probe
from optiscope.lab.adam_correction_probe import hyper_from_optimizer, make_adam_correction_probe
from optiscope.lab.probes import ProbeState
from optiscope.optim import Adam
from optiscope.optim.flows import AdamHyper, full_batch_correction, model_loss


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).double()
    return Problem(net, torch.nn.CrossEntropyLoss(), train=(X, y))


def test_probe_matches_correction_term_and_is_pure():
    problem = _problem()
    opt = Adam(problem.model.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    X, y = problem.train
    for _ in range(3):
        opt.zero_grad()
        problem.loss_fn(problem.model(X), y).backward()
        opt.step()
    before = {n: p.detach().clone() for n, p in problem.model.named_parameters()}
    state = ProbeState(step=3, model=problem.model, optimizer=opt, problem=problem)
    out = make_probe("adam_correction")(problem, state)
    for n, p in problem.model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    f, params = model_loss(problem.model, problem.loss_fn, problem.probe_batch)
    ref = full_batch_correction(f, params, AdamHyper(h=0.01, beta1=0.8, beta2=0.95, eps=1e-6), n=3)
    assert out["adam_correction_norm"] == pytest.approx(ref["norm"], rel=1e-10)
    assert out["adam_correction_cosine"] == pytest.approx(ref["cosine"], rel=1e-10)
    assert out["adam_correction_relative"] == pytest.approx(ref["norm"] / float(ref["gradient"].norm()))
    assert 0.0 <= out["adam_correction_small_eps_fraction"] <= 1.0
    # dense check of the correction term: bias = kappa * H (g / sqrt(g^2 + eps)) at n = 3
    from optiscope.optim.flows import ParamSpace
    from optiscope.theory.adam import correction_coefficient

    sp = ParamSpace(params)
    theta = sp.flatten(params)
    F = lambda x: f(sp.unflatten(x))
    gr = torch.func.grad(F)(theta)
    H = torch.func.hessian(F)(theta)
    kappa = torch.as_tensor(correction_coefficient(gr.numpy(), 0.01, 0.8, 0.95, 1e-6, n=3))
    bias = kappa * (H @ (gr / torch.sqrt(gr * gr + 1e-6)))
    assert out["adam_correction_norm"] == pytest.approx(float(bias.norm()), rel=1e-8)


def test_probe_in_a_run_and_bad_specs():
    problem = _problem()
    res = Run(problem, "adam:lr=0.01,betas=[0.9,0.99],eps=1e-8", steps=4, full_batch=True,
              probes=["adam_correction"], probe_every=2, checkpoint=False).execute()
    vals = res.metrics[res.metrics["metric"] == "adam_correction_cosine"]["value"]
    assert len(vals) >= 2 and all(math.isfinite(v) and -1 <= v <= 1 for v in vals.iloc[1:])
    with pytest.raises(ValueError, match="beta1"):
        make_adam_correction_probe(beta1=1.5)
    with pytest.raises(ValueError, match="eps"):
        make_adam_correction_probe(eps=0.0)
    sgd = torch.optim.SGD(problem.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="neither Adam nor RMSProp"):
        hyper_from_optimizer(sgd)
