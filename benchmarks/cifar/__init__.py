"""The CIFAR-10 reproduction of the paper's Table 1, Table 2, Fig. 4 and Fig. 6.

Stages: :mod:`.data` and :mod:`.oodsets` (the images), :mod:`.augment`, :mod:`.classifier`
and :mod:`.objectives` (the IB-INN generative classifier), :mod:`.train` and
:mod:`.presets`, :mod:`.metrics`, :mod:`.report` and :mod:`.curves`; commands: :mod:`.ood`,
:mod:`.outliers`, :mod:`.trainsize` and :mod:`.sweep`.
"""
