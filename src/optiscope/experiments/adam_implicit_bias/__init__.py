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

:mod:`.common` holds the shared bilinear problem and trajectory distances.
"""
