"""Reproductions of research notes on exponential learning rates, scale invariance and deep linear networks as
preconditioners, after Z. Li, S. Arora (2020), *An Exponential Learning Rate Schedule for Deep Learning.* ICLR
2020 (arXiv:1910.07454); S. Arora, N. Cohen, E. Hazan (2018), *On the Optimization of Deep Networks: Implicit
Acceleration by Overparameterization.* ICML 2018; and S. Arora, N. Cohen, W. Hu, Y. Luo (2019), *Implicit
Regularization in Deep Matrix Factorization.* NeurIPS 2019 (arXiv:1905.13655).

Experiments (registered names):

* ``explr_equivalence`` (weight decay with a constant learning rate and momentum equals an exponential
  learning rate without weight decay on a BatchNorm MLP, after Li & Arora 2020);
* ``explr_scale_invariance`` (the scale-invariance lemma on a BatchNorm MLP);
* ``deep_linear_dynamics`` (depth as a preconditioner: the end-to-end step and the singular-value dynamics,
  after Arora et al. 2018);
* ``matrix_completion`` (deep matrix completion: depth, initialisation scale and optimizer against
  nuclear-norm minimisation, after Arora et al. 2019);
* ``deep_linear_invariances`` (Adam's invariance to rescaling the gradients, and the ratio penalty's gradients
  staying in the span of W under GD, from the research notes).
"""
