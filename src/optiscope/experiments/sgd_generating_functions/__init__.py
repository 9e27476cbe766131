"""Reproductions of M. Velikanov, D. Kuznedelev, D. Yarotsky (2023), *A view of mini-batch SGD via generating
functions: conditions of convergence, phase transitions, benefit from negative momenta.* ICLR 2023
(arXiv:2206.11124): the loss of mini-batch SGD with momentum on quadratic problems, predicted from the
spectrum.

Experiments (registered names):

* ``sgd_loss_curves`` (loss curves predicted from the NTK spectrum against sampled SGD and the network);
* ``sgd_stability_map`` (stability of SGD with momentum over learning rate and momentum: theory against
  simulation);
* ``sgd_phase_diagram`` (power-law phases, asymptotic rates and the transition time, Fig. 3);
* ``sgd_negative_momentum`` (negative momentum in the noise-dominated phase, Prop. 5, Fig. 6);
* ``sgd_batch_scaling`` (the critical learning rate and the loss against the batch size, Prop. 3-4, Figs. 12-14;
  the power law of full-batch GD, Fig. 1);
* ``sgd_divergence_onset`` (onset time and growth rate of the divergence above the critical lr, Eq. 24, Fig. 3);
* ``sgd_noise_models`` (additive against sampling noise, App. G, with the exact and SE recursions).

:mod:`.common` holds the shared NTK problem, network training and error measures.
"""
