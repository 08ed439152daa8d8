"""How sure the model was of each token it generated, shown in colour (`generate --confidence`).

The figures themselves (`TokenConfidence`, `measure`) are computed by the decoding core
(llamarun/logprobs.py); this module colours a terminal by them.
"""
from __future__ import annotations

from ..logprobs import TokenConfidence

# ----------------------------------------------------------------------------------------------
# colours for the terminal: by the token's probability under the model

CONFIDENT, UNSURE = 0.5, 0.2


def colour(confidence: TokenConfidence | None) -> str | None:
    """A rich style for a token: green from p >= 0.5, yellow from 0.2, red below; None: no colour."""
    if confidence is None:
        return None
    if confidence.prob >= CONFIDENT:
        return "green"
    return "yellow" if confidence.prob >= UNSURE else "red"


LEGEND = (f"confidence (model probability of each token): green >= {CONFIDENT}, "
          f"yellow >= {UNSURE}, red below")
