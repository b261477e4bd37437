"""Conformance: the reference codecs in scalellm.quant against bitsandbytes, bit for bit."""
