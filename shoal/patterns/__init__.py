"""Building blocks for serving several models as one: ensembles, routing, shadowing, canaries
and bandits. Each is a deployment you bind like your own, with bound deployments as members::

    from shoal import serve
    from shoal.patterns import Ensemble, vote

    app = Ensemble.bind([ClassifierA.bind(), ClassifierB.bind(), ClassifierC.bind()], vote)

They are plain Python (read them in this package) and nest in each other: a
block stands wherever a model stands. Every block answers

* ``await handle.remote(*args, **kwargs)``: the plain answer, as a member gives it;
* ``await handle.with_metadata.remote(*args, **kwargs)``: an :class:`EnsembleResult`
  or :class:`RoutedResult` (the answer and what the block did);
* ``await handle.stats.remote()``: this replica's counters; a summary of them shows
  in ``serve.status()`` (``status_details()``), and counters on ``/metrics``;
* HTTP, as an ingress: the JSON body is passed on as the one argument (an empty
  body as none); the answer is the body, the metadata the ``x-shoal-metadata``
  header (JSON); ``GET <prefix>/stats``; for a bandit, ``POST <prefix>/feedback``.

The guide is ``docs/patterns.md``.
"""

from shoal.patterns._bandit import BanditRouter, BanditState
from shoal.patterns._canary import Canary
from shoal.patterns._common import METADATA_HEADER, RoutedResult
from shoal.patterns._ensemble import Ensemble, EnsembleResult, mean, stack, vote
from shoal.patterns._errors import FeedbackError, PatternError, QuorumError, SelectionError
from shoal.patterns._select import Selector
from shoal.patterns._shadow import Shadow

__all__ = [
    "METADATA_HEADER",
    "BanditRouter",
    "BanditState",
    "Canary",
    "Ensemble",
    "EnsembleResult",
    "FeedbackError",
    "PatternError",
    "QuorumError",
    "RoutedResult",
    "SelectionError",
    "Selector",
    "Shadow",
    "mean",
    "stack",
    "vote",
]
