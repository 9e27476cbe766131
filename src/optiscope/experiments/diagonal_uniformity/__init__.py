"""Reproductions of K. Jiang, D. Malik, Y. Li (2023), *How Does Adaptive Optimization Impact Local Neural
Network Geometry?* NeurIPS 2023 (arXiv:2211.02254): Adam reaches regions whose Hessian diagonal is more
uniform, measured by :math:`R_{\\mathrm{med}}`, than SGD with momentum does.

Experiments (registered names):

* ``rmed_lm`` (small transformer language model, §4.1, App. A.3), ``rmed_lm_random`` (random targets, §4.2)
  and ``rmed_lm_wd`` (weight decay, App. A.7), all in :mod:`.rmed_lm`;
* ``rmed_same_loss`` (Adam vs SGD+M at equal training loss, App. A.3);
* ``rmed_adaptive`` (Adagrad, RMSprop and AMSGrad, App. A.1-A.2);
* ``rmed_switch`` (switching from SGD to Adam, App. A.4);
* ``rmed_cnn`` (a small CNN on Fashion-MNIST, App. A.8);
* ``rmed_lowrank`` (low rank, singular-vector uniformity :math:`R_u`, §4.3, §6, App. A.5-A.6);
* ``rmed_two_layer`` (Theorem 1 on a two-layer linear network);
* ``rmed_restart`` (SGD+M restarted from an Adam iterate and from an SGD+M iterate of the same loss, Fig. 1(a));
* ``rmed_init_gain`` (smoothness and condition number of a transformer layer at a large init gain, §3.1);
* ``rmed_adagrad_init`` (Adagrad vs SGD under uniform and normal inits of different gains, App. A.1);
* ``rmed_lm_large_wd`` (Adam vs SGD+M under large weight decay, App. A.7);
* ``rmed_hessian_structure`` (the Hessian becomes more diagonal during training, App. E Fig. 14; right singular
  vectors, §6, App. A.5).

:mod:`.common` holds their shared protocol: learning-rate tuning, the :math:`R_{\\mathrm{med}}` probe, the
summaries and the claims built from them.
"""
