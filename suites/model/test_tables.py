"""The cross-method table is built from recorded metric dicts, whatever test recorded them."""

from __future__ import annotations

import pytest

from scalellm import tables

pytestmark = [pytest.mark.reference]


def _metric(name, value, device_class="cpu-x86_64"):
    return {"test_id": "suites/model/test_x.py::t[cpu]", "name": name, "value": value, "unit": "",
            "device": device_class.split("-")[0], "device_class": device_class}


def test_rows_follow_method_order_and_missing_cells_show_a_dash():
    metrics = [_metric("perplexity:nf4-dq", 17.9), _metric("perplexity:fp32", 14.3),
               _metric("kld_mean:fp32", 0.0), _metric("top1_agreement:nf4-dq", 0.75),
               _metric("load_peak_rss:fp32", 1e8)]  # not a table quantity: ignored
    header, rows = tables.cross_method_table(metrics)
    assert header[:3] == ["device", "method", "bytes/param"] and header[-2:] == ["decode tok/s", "decode / bandwidth bound"]
    assert [r[1] for r in rows] == ["fp32", "nf4-dq"]
    fp32, nf4 = ({h: c for h, c in zip(header, r)} for r in rows)
    assert fp32["perplexity"] == "14.30" and fp32["KLD"] == "0.0000" and fp32["top-1"] == "-"
    assert nf4["top-1"] == "75.0%" and nf4["KLD"] == "-"


def test_devices_get_separate_rows():
    metrics = [_metric("perplexity:fp32", 14.3), _metric("perplexity:fp32", 14.31, "cuda-nvidia-h100-80gb-hbm3")]
    _, rows = tables.cross_method_table(metrics)
    assert [(r[0], r[1]) for r in rows] == [("cpu-x86_64", "fp32"), ("cuda-nvidia-h100-80gb-hbm3", "fp32")]


def test_metric_name_round_trips_and_rejects_unknown_quantities():
    assert tables.parse_name(tables.metric_name("kld_mean", "nf4-dq")) == ("kld_mean", "nf4-dq")
    assert tables.parse_name("max_abs_dlogit_eager_vs_sdpa:fp32") is None
    with pytest.raises(ValueError):
        tables.metric_name("speed", "fp32")
