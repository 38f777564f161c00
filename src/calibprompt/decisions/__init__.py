"""From calibrated probabilities to decisions: referral thresholds with a high-probability bound
on the error among accepted cases (:mod:`.referral`, Learn then Test), and conformal prediction
sets with marginal or class-conditional coverage (:mod:`.conformal`). Both work on
(probabilities, labels) arrays of a calibration split, disjoint from the data that trained or
tuned the model."""

from calibprompt.decisions.conformal import (
           SCORES,
           ConformalSets,
           fit_conformal,
           min_per_class,
           set_outcome,
)
from calibprompt.decisions.referral import (
           THRESHOLDS,
           Referral,
           fit_referral,
           min_accepted,
           referral_outcome,
)

__all__ = ["SCORES", "THRESHOLDS", "ConformalSets", "Referral", "fit_conformal", "fit_referral", "min_accepted",
           "min_per_class", "referral_outcome", "set_outcome"]
