"""The CompoDistill objective: LM + KD + visual-attention alignment, layer matching, TAF."""
