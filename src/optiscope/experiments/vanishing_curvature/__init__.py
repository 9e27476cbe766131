"""Reproductions of A. Orvieto, J. Kohler, D. Pavllo, T. Hofmann, A. Lucchi (2022), *Vanishing Curvature in
Randomly Initialized Deep ReLU Networks.* AISTATS 2022 (arXiv:2106.03763, 2021: *Vanishing Curvature and the
Power of Adaptive Methods in Randomly Initialized Deep Networks*): at random initialisation, gradients and
curvature of deep narrow ReLU networks vanish with depth, and adaptive methods escape the resulting plateau.

Experiments (registered names):

* ``init_chain`` (the neural chain: Monte Carlo medians against the exact theory, Fig. 2);
* ``init_mlp`` (MLPs at initialisation: gradients and curvature against depth and width, Fig. 1, 4, 12, 13,
  15);
* ``init_arch`` (residual connections and BatchNorm restore non-vanishing curvature, Fig. 6, 7, 17);
* ``init_escape`` (plateau escape on the neural chain: GD, perturbed GD, RMSprop, Fig. 3, 23-25);
* ``init_fashion`` (a deep narrow ReLU MLP on Fashion-MNIST: SGD and momentum against RMSprop and Adam, Fig.
  5).
* ``init_variance`` (median forward signal vs width and depth, the variance keeping it at one, orthogonal init,
  linear vs ReLU, Fig. 14, 20, 22);
* ``init_deep_resnet`` (a deep stripped ResNet: RMSprop trains it, SGD does not, Fig. 8).
"""
