"""Analyses of knowledge neurons (the paper's findings as functions) and causal tracing beside attribution.

* :mod:`.distribution`: neurons per fact, per layer, shared within and across relations (from the dataset
  attribution's output).
* :mod:`.activations`: activation of a fact's neurons by prompt type (own / same relation / other relations /
  Wikipedia sentences mentioning the subject), bootstrap interval of own − other relations.
* :mod:`.top_text`: top- and bottom-activating text of neurons, a streaming scan with an early-stopped forward.
* :mod:`.tracing`: causal tracing (Meng et al. 2022); :mod:`.where`: tracing over a data set (Lightning loop)
  compared with the layers of the knowledge neurons.
* :mod:`.reach`: where one edit moves other prompts' tokens at the edited layer (shares of its δ).
"""
