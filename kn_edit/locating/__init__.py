"""The paper's method (Dai et al. 2022): integrated-gradients attribution over FFN activations, coarse-to-fine
selection of knowledge neurons, the dataset-wide attribution loop, and suppressing / amplifying neurons.
Depends on ``models`` and ``storage``."""
