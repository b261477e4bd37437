"""The cross-method table's quality rows of one method, recorded the same way by every tier.

``scalellm.tables`` reads rows named ``"<quantity>:<method>"``; each tier holds them to its own
tolerances (stated beside their justification in the tier's module), so only the names, units and
directions live here.
"""

from __future__ import annotations

from scalellm import tables


def record_quality_rows(record_metric, method: str, q, *, ppl, kld, top1, dlogit=None) -> None:
    """Perplexity, mean KLD and top-1 agreement of ``q`` (a ``scalellm.quality.Quality``) under
    ``method``'s table names, and p99.9 |Δlogit| when a ``dlogit`` tolerance is given."""
    record_metric(tables.metric_name("perplexity", method), q.perplexity, unit="ppl", better="lower", tolerance=ppl)
    record_metric(tables.metric_name("kld_mean", method), q.kld_mean, unit="nats/token", better="lower", tolerance=kld)
    record_metric(tables.metric_name("top1_agreement", method), q.top1_agreement, unit="fraction", better="higher",
                  tolerance=top1)
    if dlogit is not None:
        record_metric(tables.metric_name("dlogit_p999", method), q.dlogit_p999, unit="logit", better="lower",
                      tolerance=dlogit)
