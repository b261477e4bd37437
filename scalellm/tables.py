"""The cross-method table of the real-model tier, built from the metrics a run recorded.

The suites name each figure ``"<quantity>:<method>"`` (:func:`metric_name`), e.g.
``"perplexity:nf4-dq"``; this module reads them back, whatever test recorded them, and lays out one
row per (device, method)::

    device | method | bytes/param | perplexity | KLD | top-1 | p99.9 |Δlogit| | prefill tok/s | decode tok/s
"""

from __future__ import annotations

from scalellm.load import METHODS

#: quantity -> column header, in column order.
COLUMNS = {
    "bytes_per_param": "bytes/param",
    "perplexity": "perplexity",
    "kld_mean": "KLD",
    "top1_agreement": "top-1",
    "dlogit_p999": "p99.9 |Δlogit|",
    "prefill_tok_s": "prefill tok/s",
    "decode_tok_s": "decode tok/s",
    "decode_share_of_bound": "decode / bandwidth bound",
}
SEPARATOR = ":"


def metric_name(quantity: str, method_name: str) -> str:
    """The metric name a suite records a per-method figure under: ``"perplexity:nf4-dq"``."""
    if quantity not in COLUMNS:
        raise ValueError(f"unknown quantity {quantity!r}; known: {', '.join(COLUMNS)}")
    return f"{quantity}{SEPARATOR}{method_name}"


def parse_name(name: str) -> tuple[str, str] | None:
    """``"perplexity:nf4-dq"`` -> ("perplexity", "nf4-dq"); None for a name of another form."""
    quantity, sep, method_name = name.partition(SEPARATOR)
    if not sep or quantity not in COLUMNS or not method_name:
        return None
    return quantity, method_name


def _format(quantity: str, value: float) -> str:
    if quantity in ("top1_agreement", "decode_share_of_bound"):
        return f"{100 * value:.1f}%"
    if quantity == "bytes_per_param":
        return f"{value:.3f}"
    if quantity == "kld_mean":
        return f"{value:.4f}"
    if quantity in ("perplexity", "dlogit_p999"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def _method_order(name: str) -> tuple[int, str]:
    order = list(METHODS)
    return (order.index(name), name) if name in order else (len(order), name)


def cross_method_table(metrics: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the cross-method table from metric dicts.

    Each dict has ``test_id``, ``name``, ``value``, ``unit``, ``device`` and ``device_class``;
    names not of the ``"<quantity>:<method>"`` form are ignored. Rows are sorted by device class,
    then by the order of :data:`scalellm.load.METHODS`; a missing figure is shown as ``"-"``. When a
    figure was recorded twice for the same row (two tests), the last one wins.
    """
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for m in metrics:
        parsed = parse_name(m["name"])
        if parsed is None:
            continue
        quantity, method_name = parsed
        key = (m.get("device_class") or m.get("device", ""), method_name)
        cells.setdefault(key, {})[quantity] = float(m["value"])
    header = ["device", "method", *COLUMNS.values()]
    rows = []
    for device_class, method_name in sorted(cells, key=lambda k: (k[0], _method_order(k[1]))):
        values = cells[(device_class, method_name)]
        rows.append([device_class, method_name,
                     *(_format(q, values[q]) if q in values else "-" for q in COLUMNS)])
    return header, rows


__all__ = ["COLUMNS", "cross_method_table", "metric_name", "parse_name"]
