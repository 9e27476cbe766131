"""Reproductions of M. D. Cattaneo, J. M. Klusowski, B. Shigida (2024), *On the Implicit Bias of Adam.* ICML
2024 (arXiv:2309.00079): Adam follows a modified flow whose correction term penalises or anti-penalises a
perturbed one-norm of the gradient, depending on the hyperparameters.

Experiments (registered names):

* ``adam_bilinear`` (the limit point on the bilinear hyperbola follows the sign of the correction, Fig. 2,
  Table 1);
* ``adam_flow_order`` (the first-order flow is :math:`O(h)`, the second-order modified flow :math:`O(h^2)`,
  Thm. 3.1);
* ``adam_trajectory_closeness`` (full-batch Adam against the first- and second-order flows, Fig. 3);
* ``adam_one_norm_sweeps`` (perturbed one-norm and test accuracy under :math:`\\beta` sweeps, Fig. 4-6).
* ``adam_eps_regimes`` (the sign of the implicit bias in the small- and large-eps regimes, over eps, Eq. 4-7,
  Table 1);
* ``adam_rmsprop_variants`` (RMSProp and eps outside the square root: modified equations and (anti-)penalisation,
  App. B-E, Remark 1.2);
* ``adam_minibatch_flow`` (mini-batch Adam against the mini-batch and full-batch modified flows, Thm. 3.1);
* ``adam_one_norm_cnn`` (the one-norm hill and the beta orderings on a CNN, Fig. 6-8).

:mod:`.common` holds the shared bilinear problem and trajectory distances.
"""
