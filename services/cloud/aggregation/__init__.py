"""Aggregation rules, found by the name a job gives (`--aggregator`).

Adding a rule is one class in one file: subclass `Rule`, set its `name`, override
`aggregate` (and `problems`, what it needs to withstand f hostile agents of n),
decorate it with `@register`, and import its module below. JobSpec validation,
`names()` (the CLI's choices) and `cloud.robust.aggregate` find it from there.
"""

from cloud.aggregation.base import Round, Rule, get, names, register, unregister
from cloud.aggregation.defence import Defence
from cloud.aggregation.weights import Weighting, weighting

# Registration order is the order names() lists the rules in (and the CLI offers them): the default first.
# isort: off
from cloud.aggregation.mean import Mean
from cloud.aggregation.median import Median, TrimmedMean, MeanAroundMedian
from cloud.aggregation.krum import Krum, MultiKrum
# isort: on

__all__ = [
    "Defence", "Krum", "Mean", "MeanAroundMedian", "Median", "MultiKrum", "Round", "Rule", "TrimmedMean",
    "Weighting", "get", "names", "register", "unregister", "weighting",
]
