"""Sparkplug B 3.0 support of the wire contract: topics, payload encoding and decoding.

The schema is sparkplug_b.proto; sparkplug_b_pb2.py(i) are generated from it by regenerate.sh.
"""

from meterflow.sparkplug.codec import (
    BD_SEQ_METRIC,
    NAMESPACE,
    REBIRTH_METRIC,
    AliasTable,
    DecodedMetric,
    DecodedPayload,
    MessageType,
    MetricValue,
    SparkplugError,
    SparkplugTopic,
    decode_payload,
    encode_dbirth,
    encode_ddata,
    encode_ddeath,
    encode_nbirth,
    encode_ncmd_rebirth,
    encode_ndeath,
    next_seq,
    parse_topic,
    topic,
)

__all__ = [
    "BD_SEQ_METRIC",
    "NAMESPACE",
    "REBIRTH_METRIC",
    "AliasTable",
    "DecodedMetric",
    "DecodedPayload",
    "MessageType",
    "MetricValue",
    "SparkplugError",
    "SparkplugTopic",
    "decode_payload",
    "encode_dbirth",
    "encode_ddata",
    "encode_ddeath",
    "encode_nbirth",
    "encode_ncmd_rebirth",
    "encode_ndeath",
    "next_seq",
    "parse_topic",
    "topic",
]
